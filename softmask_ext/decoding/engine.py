"""The decoding engine: static buffers, one fixed-shape step, CUDA-graph capture and replay.

A run over ``B`` prompts of (left-padded) length ``P`` with ``N`` new tokens keeps a canvas ``[B, P + N]``. Its
decoded region starts at ``S``: the first mask token in any prompt (Dream decodes those too), else ``P``; the region
``S .. P+N-1`` has ``L = P + N - S`` positions. A run repeats :meth:`DiffusionDecoder.step`:

1. forward pass, projecting through the LM head only the hidden rows that predict the region's positions (by the
   model family's ``logit_shift``: rows ``S-1 .. P+N-2`` for Dream, position 0 taking row 0; rows ``S .. P+N-1`` for
   LLaDA) -> logits ``[B, L, V]``;
2. propose a token and a confidence for each position of the region, and unmask the masked positions the algorithm
   chooses (time ratios precomputed on the host, counts and selection on the device on fixed shapes, noise drawn
   before the step);
3. with soft-masking, rebuild the input embeddings of the region from this step's logits: still-masked positions
   get the SM blend, the others their plain embedding (one fixed-shape kernel call).

On CUDA nothing in a step reads a value back to the host, so the step is captured once as a graph and replayed
(on the CPU, top-p sorts only the rows that need it, which reads a count back; see :mod:`.sampling`).
User hooks need the full logits and run Python between the parts of a step; with hooks the loop runs eagerly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..model.family import align_logits, family_of, prediction_row_index
from ..soft_mask import SoftMask
from .options import DecodeOptions, Prompt
from .sampling import StepNoise, propose, select_transfers
from .schedule import step_ratios

__all__ = ["DiffusionDecoder", "TokensHook", "LogitsHook"]

# Dream's hook signatures: (step or None, canvas [B, T], logits [B, T, V] or None) -> canvas / logits.
TokensHook = Callable[[int | None, Tensor, Tensor | None], Tensor]
LogitsHook = Callable[[int, Tensor, Tensor], Tensor]


class DiffusionDecoder:
    """Buffers and step of decoding runs of one shape (``batch`` prompts of length ``prompt_len``).

    Args:
        model: callable as ``model(input_ids=, inputs_embeds=, attention_mask=, position_ids=, logits_rows=)``
            returning an object with ``.logits``, with ``.config.vocab_size`` and ``get_input_embeddings()``
            (e.g. :class:`softmask_ext.DreamModel`).
        options: validated decoding settings.
        padded: whether prompts carry an attention mask (some row is left-padded).
        decode_from: ``S``, the first position decoded (default ``prompt_len``: prompts without mask tokens).
        soft_mask: the SM module (on the model's device), or ``None`` for binary masks.
        generator: source of the sampling noise (``None``: torch's default generator of the device).
        cuda_graph: capture the step in a CUDA graph (``None``: when the model is on CUDA).

    A decoder can be reused for any number of runs of the same shape and first mask column (:meth:`run`). The graph is captured once,
    after the first run's first step (done eagerly as warm-up), and replayed for every later step and run; it reads
    the model's parameters in place, so a decoder must not outlive a change of the model's parameter tensors
    (in-place updates are fine, ``model.to(...)`` or reloading is not).
    """

    def __init__(
        self,
        model: nn.Module,
        options: DecodeOptions,
        *,
        batch: int,
        prompt_len: int,
        padded: bool,
        decode_from: int | None = None,
        soft_mask: SoftMask | None = None,
        generator: torch.Generator | None = None,
        cuda_graph: bool | None = None,
    ) -> None:
        embedding = model.get_input_embeddings().weight
        device = embedding.device
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a model on a CUDA device, this one is on {device}")
        self.model, self.options, self.soft_mask, self.cuda_graph = model, options, soft_mask, cuda_graph
        self._graph: torch.cuda.CUDAGraph | bool | None = None  # captured on the first graphed run, then replayed
        self.embedding = embedding
        total = prompt_len + options.max_new_tokens
        decode_from = prompt_len if decode_from is None else decode_from
        if not 0 <= decode_from <= prompt_len or decode_from == total:
            raise ValueError(f"decode_from must lie in [0, {prompt_len}] and leave a position to decode, "
                             f"got {decode_from}")
        self.batch, self.prompt_len, self.decode_from = batch, prompt_len, decode_from
        self.length = total - decode_from

        self.ratios = step_ratios(options.steps, options.eps).to(device)
        self.step_index = torch.zeros(1, dtype=torch.int64, device=device)

        self.canvas = torch.empty(batch, total, dtype=torch.int64, device=device)
        self.attention_mask = torch.ones(batch, total, dtype=torch.bool, device=device) if padded else None
        self.position_ids = torch.arange(total, device=device).expand(batch, total).contiguous()
        self.logit_shift = family_of(model).logit_shift
        self.logits_rows = (prediction_row_index(torch.arange(decode_from, total, device=device), self.logit_shift)
                            .expand(batch, -1).contiguous())
        # Masks per row when the run starts (after the tokens hook's first edit): the SM schedules' denominator.
        self.initial_masks = torch.ones(batch, 1, device=device)
        if soft_mask is not None:
            self.embeds = torch.empty(batch, total, embedding.shape[1], dtype=embedding.dtype, device=device)
        self.noise = StepNoise(
            (batch, self.length),
            alg=options.alg,
            temperature=options.temperature,
            alg_temp=options.alg_temp,
            device=device,
            generator=generator,
        )

    @property
    def region(self) -> Tensor:
        """View ``[B, L]`` of the canvas's decoded region."""
        return self.canvas[:, self.decode_from:]

    # ------------------------------------------------------------------ the step
    def step(self) -> None:
        """One decoding step on the static buffers; capturable (no host sync, fixed shapes)."""
        logits = self._logits(self.logits_rows)
        self._unmask(logits)
        if self.soft_mask is not None:
            self._soft_embeddings(logits)

    def _logits(self, rows: Tensor | None) -> Tensor:
        inputs = {"inputs_embeds": self.embeds} if self.soft_mask is not None else {"input_ids": self.canvas}
        out = self.model(**inputs, attention_mask=self.attention_mask, position_ids=self.position_ids,
                         logits_rows=rows)
        return out.logits

    def _unmask(self, logits: Tensor) -> None:
        """Choose and write this step's tokens, from the logits ``[B, L, V]`` of the region."""
        opts = self.options
        region = self.region
        masked = region == opts.mask_token_id
        tokens, confidence = propose(
            logits, alg=opts.alg, temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k,
            token_noise=self.noise.token,
        )
        transfer = select_transfers(
            masked,
            alg=opts.alg,
            confidence=confidence,
            ratio=self.ratios.index_select(0, self.step_index),
            alg_temp=opts.alg_temp,
            select_noise=self.noise.select,
        )
        region.copy_(torch.where(transfer, tokens, region))
        self.step_index += 1

    def _soft_embeddings(self, logits: Tensor) -> None:
        """Next inputs of the region: SM blend where still masked, plain embedding elsewhere."""
        region = self.region
        progress = None
        if self.soft_mask.schedule != "none":
            left = (region == self.options.mask_token_id).sum(-1, keepdim=True)
            progress = (left / self.initial_masks).expand_as(region).reshape(-1)
        rows = self.soft_mask.soft_rows(
            logits, None, region.reshape(-1), self.embedding, self.options.mask_token_id, progress
        )
        self.embeds[:, self.decode_from:] = rows.view(self.batch, self.length, -1)

    # ------------------------------------------------------------------ runs
    def load(self, prompt: Prompt, tokens_hook: TokensHook | None = None) -> None:
        """Reset the buffers for a new run: prompt + masks, Dream's positions for left padding, step 0, the
        tokens hook's edit of the initial canvas (Dream calls it once before the first step), plain embeddings."""
        if (prompt.batch, prompt.length, prompt.attention_mask is not None, prompt.first_mask) != (
            self.batch, self.prompt_len, self.attention_mask is not None, self.decode_from
        ):
            raise ValueError("this decoder was built for another batch size, prompt length, padding or first mask")
        self.canvas[:, : self.prompt_len] = prompt.input_ids
        self.canvas[:, self.prompt_len:] = self.options.mask_token_id
        if prompt.attention_mask is not None:
            self.attention_mask[:, : self.prompt_len] = prompt.attention_mask
            positions = self.attention_mask.long().cumsum(-1) - 1
            self.position_ids.copy_(positions.masked_fill(~self.attention_mask, 1))
        self.step_index.zero_()
        if tokens_hook is not None:
            self._apply_tokens_hook(tokens_hook, None, None)
        self.initial_masks.copy_((self.region == self.options.mask_token_id).sum(-1, keepdim=True).clamp_min(1))
        if self.soft_mask is not None:
            # The first step has no previous prediction: plain embeddings everywhere.
            self.embeds.copy_(self.model.get_input_embeddings()(self.canvas))

    @torch.no_grad()
    def run(
        self,
        prompt: Prompt,
        *,
        tokens_hook: TokensHook | None = None,
        logits_hook: LogitsHook | None = None,
        output_history: bool = False,
    ) -> tuple[Tensor, list[Tensor] | None]:
        """Decode ``prompt``; returns the final canvas ``[B, P + N]`` and, if asked, the canvas after each step."""
        self.load(prompt, tokens_hook)
        history: list[Tensor] | None = [] if output_history else None
        steps = self.options.steps
        if tokens_hook is not None or logits_hook is not None:
            for i in range(steps):
                self._hooked_step(i, tokens_hook, logits_hook)
                _record(history, self.canvas)
        elif self.cuda_graph:
            self._run_graphed(steps, history)
        else:
            for _ in range(steps):
                self.noise.draw()
                self.step()
                _record(history, self.canvas)
        return self.canvas.clone(), history

    def _run_graphed(self, steps: int, history: list[Tensor] | None) -> None:
        first = 0
        if self._graph is None:
            # The first graphed run does step 0 eagerly, on a side stream: it warms up lazy initialisation (cuBLAS
            # handles, rotary tables) as capture requires, and does real work instead of a throw-away warm-up.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.noise.draw()
                self.step()
            torch.cuda.current_stream().wait_stream(side)
            _record(history, self.canvas)
            first = 1
            self._graph = self._capture()
        for _ in range(first, steps):
            self.noise.draw()
            if self._graph:
                self._graph.replay()
            else:
                self.step()
            _record(history, self.canvas)

    def _capture(self) -> torch.cuda.CUDAGraph | bool:
        """The step as a CUDA graph over the static buffers, or False (eager from then on) if capture fails."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.step()
        except RuntimeError as e:  # capture only records, so the buffers are untouched: carry on eagerly
            warnings.warn(f"CUDA graph capture failed ({e}); decoding eagerly", RuntimeWarning, stacklevel=4)
            return False
        return graph

    # ------------------------------------------------------------------ hooks (eager)
    def _hooked_step(self, i: int, tokens_hook: TokensHook | None, logits_hook: LogitsHook | None) -> None:
        """A step in Dream's form: full logits, row i predicting position i, go to the hooks, then unmasking, then
        SM."""
        self.noise.draw()
        logits = align_logits(self._logits(None), self.logit_shift)
        if logits_hook is not None:
            logits = logits_hook(i, self.canvas, logits)
            if not isinstance(logits, Tensor) or logits.shape[:2] != self.canvas.shape:
                raise TypeError("generation_logits_hook_func must return logits of shape [B, T, V]")
        region_logits = logits[:, self.decode_from:]
        self._unmask(region_logits)
        if tokens_hook is not None:
            self._apply_tokens_hook(tokens_hook, i, logits)
        if self.soft_mask is not None:
            self._soft_embeddings(region_logits)

    def _apply_tokens_hook(self, hook: TokensHook, i: int | None, logits: Tensor | None) -> None:
        out = hook(i, self.canvas, logits)
        if not isinstance(out, Tensor) or out.shape != self.canvas.shape:
            raise TypeError(f"generation_tokens_hook_func must return a canvas of shape {list(self.canvas.shape)}")
        if out is not self.canvas:
            self.canvas.copy_(out)
        if self.soft_mask is not None and i is not None:
            # The hook may have edited the prompt too: keep its embeddings in step with the canvas (the region's
            # are rebuilt after the hook).
            self.embeds[:, : self.decode_from] = self.model.get_input_embeddings()(self.canvas[:, : self.decode_from])


def _record(history: list[Tensor] | None, canvas: Tensor) -> None:
    if history is not None:
        history.append(canvas.clone())
