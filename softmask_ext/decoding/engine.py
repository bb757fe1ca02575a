"""The decoding engine: static buffers, one fixed-shape step, CUDA-graph capture and replay.

A run over ``B`` prompts of (left-padded) length ``P`` with ``N`` new tokens keeps a canvas ``[B, P + N]``. Its
decoded region starts at ``S``: the first mask token in any prompt (Dream decodes those too), else ``P``; the region
``S .. P+N-1`` has ``L = P + N - S`` positions, decoded in blocks of ``W = block_length`` positions from left to
right (one block of ``L`` by default: Dream's and LLaDA's plain loops). Each block runs steps
(:meth:`DiffusionDecoder.step`), each of which

1. runs a forward pass and projects through the LM head only the hidden rows that predict the block's positions
   (row ``i - shift`` for position ``i``, the family's logit shift; position 0 takes row 0) -> logits ``[B, W, V]``.
   What the forward runs depends on the cache mode:

   - ``none``: the whole sequence, at every step;
   - ``prefix`` / ``dual``: the block's first step runs the whole sequence and fills a static K/V cache
     (:mod:`softmask_ext.model.kv_cache`); each later step runs only a *query window* and attends to the cache
     for the other positions: ``prefix`` from the block to the end of the sequence, ``dual`` the block alone (the
     suffix's K/V stay those of the block's first step). For a shifted family the window starts one position before
     the block (that row predicts the block's first position), and its K/V are rewritten with the window's;
2. proposes a token and a confidence for each position of the block and unmasks the masked positions the rule
   chooses: Dream's counts ``int(n * (1 - s/t))`` over each block's steps, LLaDA's even split (the remainder to the
   first steps), or every position whose confidence reaches ``threshold`` and at least the most confident one
   (counts and selection on the device, on fixed shapes; noise drawn before the step);
3. with soft-masking, rebuilds the input embeddings of the block's positions from this step's logits: still-masked
   positions get the SM blend, the others their plain embedding (one fixed-shape kernel call).

Soft-masking outside the block: positions of later blocks keep the plain mask embedding until their block starts,
and each block's first step sees plain masks in its own positions (as the first step of a plain run does); a
finished block's positions hold tokens and their plain embeddings. With a cache, the blended inputs of a step enter
the K/V of the query window only; the K/V of positions outside it (the prefix; in ``dual`` also the suffix) are
those of the block's first forward, recomputed at the start of every block.

On CUDA nothing in a step reads a value back to the host, so each step shape is captured once as a graph and
replayed: one graph for the steps without cache, and for ``prefix`` / ``dual`` one for the block's first forward
plus one per query-window length (every block in ``dual``, each block in ``prefix``). The host only decides when a
threshold-decoded block is finished: it reads one flag after each of that block's steps (Fast-dLLM does the same).
(On the CPU, top-p sorts only the rows that need it, which reads a count back; see :mod:`.sampling`.)
User hooks need the full logits and run Python between the parts of a step; with hooks the loop runs eagerly, and
without a cache.
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

__all__ = ["SM_INPUTS_RANGE", "DiffusionDecoder", "LogitsHook", "TokensHook"]

# The profiler range around building a step's SM inputs (torch.profiler.record_function; free when not profiling).
SM_INPUTS_RANGE = "softmask_ext.sm_inputs"

# Dream's hook signatures: (step or None, canvas [B, T], logits [B, T, V] or None) -> canvas / logits.
TokensHook = Callable[[int | None, Tensor, Tensor | None], Tensor]
LogitsHook = Callable[[int, Tensor, Tensor], Tensor]


class DiffusionDecoder:
    """Buffers and step of decoding runs of one shape (``batch`` prompts of length ``prompt_len``).

    Args:
        model: callable as ``model(input_ids=, inputs_embeds=, attention_mask=, position_ids=, logits_rows=)``
            (plus ``kv_cache=`` for the cache modes) returning an object with ``.logits``, with
            ``.config.vocab_size``, ``get_input_embeddings()`` and a model family (its logit shift).
        options: validated decoding settings.
        padded: whether prompts carry an attention mask (some row is left-padded).
        decode_from: ``S``, the first position decoded (default ``prompt_len``: prompts without mask tokens).
        soft_mask: the SM module (on the model's device), or ``None`` for binary masks.
        generator: source of the sampling noise (``None``: torch's default generator of the device).
        cuda_graph: capture the steps in CUDA graphs (``None``: when the model is on CUDA).
        logit_shift: the family's logit shift (default: read from ``model``'s family).

    A decoder can be reused for any number of runs of the same shape and first mask column (:meth:`run`). Graphs are
    captured on first use of each step shape (after doing that step once eagerly, as warm-up) and replayed for every
    later step and run; they read the model's parameters in place, so a decoder must not outlive a change of the
    model's parameter tensors (in-place updates are fine, ``model.to(...)`` or reloading is not).
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
        logit_shift: int | None = None,
    ) -> None:
        embedding = model.get_input_embeddings().weight
        device = embedding.device
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a model on a CUDA device, this one is on {device}")
        self.model, self.options, self.soft_mask, self.cuda_graph = model, options, soft_mask, cuda_graph
        self.shift = family_of(model).logit_shift if logit_shift is None else logit_shift
        self._graphs: dict[tuple[str, int], torch.cuda.CUDAGraph | bool] = {}  # captured on first use, replayed
        self.embedding = embedding
        total = prompt_len + options.max_new_tokens
        decode_from = prompt_len if decode_from is None else decode_from
        if not 0 <= decode_from <= prompt_len or decode_from == total:
            raise ValueError(
                f"decode_from must lie in [0, {prompt_len}] and leave a position to decode, got {decode_from}"
            )
        self.batch, self.prompt_len, self.decode_from, self.total = batch, prompt_len, decode_from, total
        self.length = total - decode_from
        self._plan_blocks(options)

        # Fast-dLLM's Dream loop ranks its fixed-count steps by negative entropy and its threshold steps by p(x0).
        self.rank_alg = options.alg
        if options.fast_dllm_compat:
            self.rank_alg = "maskgit_plus" if options.threshold is not None else "entropy"
        self.ratios = step_ratios(self.steps_per_block, options.eps).to(device)
        self.block_step = torch.zeros(1, dtype=torch.int64, device=device)
        self.block_counts = torch.zeros(batch, self.steps_per_block, dtype=torch.int64, device=device)
        self.block_initial = torch.ones(batch, 1, device=device)  # masks per row when the block starts (SM schedules)

        self.canvas = torch.empty(batch, total, dtype=torch.int64, device=device)
        self.attention_mask = torch.ones(batch, total, dtype=torch.bool, device=device) if padded else None
        self.position_ids = torch.arange(total, device=device).expand(batch, total).contiguous()
        self.prompt_index = torch.zeros(batch, total, dtype=torch.bool, device=device) if options.cfg_scale else None
        # The block's columns, and the rows of a full forward's hidden states that predict them.
        self.block_cols = torch.empty(self.block_length, dtype=torch.int64, device=device)
        self.window = self.block_cols.expand(batch, -1)
        self.full_rows = torch.empty(batch, self.block_length, dtype=torch.int64, device=device)
        self._query: tuple[Tensor, Tensor] | None = None  # (window columns [Q], their rows predicting the block)
        self._query_buffers: dict[int, tuple[Tensor, Tensor]] = {}
        self._block_start = decode_from
        self.cache = None
        if options.cache != "none":
            from ..model.kv_cache import KVCache

            self.cache = KVCache.for_model(model, batch=batch * (2 if options.cfg_scale else 1), length=total)
            self._all_cols = torch.arange(total, device=device)
        if soft_mask is not None:
            self.embeds = torch.empty(batch, total, embedding.shape[1], dtype=embedding.dtype, device=device)
        self.noise = StepNoise(
            (batch, self.block_length),
            alg=self.rank_alg,
            temperature=options.temperature,
            alg_temp=options.alg_temp,
            device=device,
            generator=generator,
            vocab_size=model.config.vocab_size,
        )

    def _plan_blocks(self, options: DecodeOptions) -> None:
        length = self.length
        self.block_length = length if options.block_length is None else options.block_length
        if length % self.block_length:
            raise ValueError(
                f"block_length ({self.block_length}) must divide the decoded length ({length}: "
                f"max_new_tokens {options.max_new_tokens} plus the prompt from its first mask token)"
            )
        self.num_blocks = length // self.block_length
        if options.steps % self.num_blocks:
            raise ValueError(
                f"steps ({options.steps}) must be a multiple of the number of blocks ({self.num_blocks} "
                f"of block_length {self.block_length})"
            )
        self.steps_per_block = options.steps // self.num_blocks
        if options.fast_dllm_compat and options.threshold is None and self.steps_per_block < 2:
            raise ValueError("fast_dllm_compat needs at least 2 steps per block (its first step commits one token)")

    @property
    def region(self) -> Tensor:
        """View ``[B, L]`` of the canvas's decoded region."""
        return self.canvas[:, self.decode_from :]

    # ------------------------------------------------------------------ the step
    def step(self, kind: str = "full") -> None:
        """One decoding step of the current block on the static buffers; capturable (no host sync, fixed shapes).

        ``kind``: ``"full"`` (the whole sequence, no cache), ``"fill"`` (the whole sequence, filling the cache: a
        block's first step in the cache modes) or ``"window"`` (the query window against the cache).
        """
        logits = self.logits(kind, self.full_rows)
        self._unmask(logits, first_only=kind == "fill" and self.options.fast_dllm_compat)
        if self.soft_mask is not None:
            self.soft_embeddings(logits)

    def logits(self, kind: str, rows: Tensor | None) -> Tensor:
        """Logits ``[B, W, V]`` of the block's positions (``[B, T, V]`` of every row when ``rows`` is None)."""
        inputs = self.embeds if self.soft_mask is not None else self.canvas
        positions, prompt_index, extra = self.position_ids, self.prompt_index, {}
        if kind == "window":
            cols, rows = self._query
            inputs, positions = inputs.index_select(1, cols), positions.index_select(1, cols)
            prompt_index = None if prompt_index is None else prompt_index.index_select(1, cols)
            extra["kv_cache"] = self.cache.at(cols)
        elif kind == "fill":
            extra["kv_cache"] = self.cache.at(self._all_cols)
        mask = self.attention_mask
        cfg = self.options.cfg_scale
        if cfg:
            # LLaDA's classifier-free guidance: the unconditional pass sees every prompt token as a mask.
            if self.soft_mask is not None:
                uncond = torch.where(prompt_index.unsqueeze(-1), self.embedding[self.options.mask_token_id], inputs)
            else:
                uncond = inputs.masked_fill(prompt_index, self.options.mask_token_id)
            inputs, positions = torch.cat([inputs, uncond]), torch.cat([positions, positions])
            mask = None if mask is None else torch.cat([mask, mask])
            rows = None if rows is None else torch.cat([rows, rows])
        key = "inputs_embeds" if self.soft_mask is not None else "input_ids"
        logits = self.model(
            **{key: inputs}, attention_mask=mask, position_ids=positions, logits_rows=rows, **extra
        ).logits
        if cfg:
            cond, uncond = logits.chunk(2)
            logits = uncond + (cfg + 1) * (cond - uncond)
        return logits

    def _unmask(self, logits: Tensor, first_only: bool = False) -> None:
        """Choose and write this step's tokens, from the logits ``[B, W, V]`` of the block."""
        opts = self.options
        block = self.canvas.gather(1, self.window)
        masked = block == opts.mask_token_id
        tokens, confidence = propose(
            logits,
            alg=self.rank_alg,
            temperature=opts.temperature,
            top_p=opts.top_p,
            top_k=opts.top_k,
            token_noise=self.noise.token,
        )
        if first_only:
            # Fast-dLLM's Dream loop: the forward that refreshes the cache commits the block's first position.
            transfer = masked & (torch.arange(masked.shape[1], device=masked.device) == 0)
        else:
            count = ratio = None
            if opts.threshold is None and opts.llada:
                count = self.block_counts.gather(1, self.block_step.expand(self.batch, 1))
            elif opts.threshold is None:
                ratio = self.ratios.index_select(0, self.block_step)
            transfer = select_transfers(
                masked,
                alg=self.rank_alg,
                confidence=confidence,
                ratio=ratio,
                alg_temp=opts.alg_temp,
                select_noise=self.noise.select,
                count=count,
                threshold=opts.threshold,
            )
        self.canvas.scatter_(1, self.window, torch.where(transfer, tokens, block))
        self.block_step += 1

    def soft_embeddings(self, logits: Tensor) -> None:
        """Next inputs of the block: SM blend where still masked, plain embedding elsewhere (a profiler range named
        :data:`SM_INPUTS_RANGE`, so that a profile of a run gives SM's share of it)."""
        with torch.profiler.record_function(SM_INPUTS_RANGE):
            self._soft_embeddings(logits)

    def _soft_embeddings(self, logits: Tensor) -> None:
        block = self.canvas.gather(1, self.window)
        progress = None
        if self.soft_mask.schedule != "none":
            left = (block == self.options.mask_token_id).sum(-1, keepdim=True)
            progress = (left / self.block_initial).expand_as(block).reshape(-1)
        rows = self.soft_mask.soft_rows(
            logits, None, block.reshape(-1), self.embedding, self.options.mask_token_id, progress
        )
        width = self.embeds.shape[-1]
        self.embeds.scatter_(1, self.window.unsqueeze(-1).expand(-1, -1, width), rows.view(self.batch, -1, width))

    # ------------------------------------------------------------------ runs
    def load(self, prompt: Prompt, tokens_hook: TokensHook | None = None) -> None:
        """Reset the buffers for a new run: prompt + masks, Dream's positions for left padding, the tokens hook's
        edit of the initial canvas (Dream calls it once before the first step), plain embeddings, the first block."""
        if (prompt.batch, prompt.length, prompt.attention_mask is not None, prompt.first_mask) != (
            self.batch,
            self.prompt_len,
            self.attention_mask is not None,
            self.decode_from,
        ):
            raise ValueError("this decoder was built for another batch size, prompt length, padding or first mask")
        self.canvas[:, : self.prompt_len] = prompt.input_ids
        self.canvas[:, self.prompt_len :] = self.options.mask_token_id
        if prompt.attention_mask is not None:
            self.attention_mask[:, : self.prompt_len] = prompt.attention_mask
            positions = self.attention_mask.long().cumsum(-1) - 1
            self.position_ids.copy_(positions.masked_fill(~self.attention_mask, 1))
        if tokens_hook is not None:
            self._apply_tokens_hook(tokens_hook, None, None)
        if self.prompt_index is not None:
            self.prompt_index.copy_(self.canvas != self.options.mask_token_id)
        if self.soft_mask is not None:
            # The first step has no previous prediction: plain embeddings everywhere.
            self.embeds.copy_(self.model.get_input_embeddings()(self.canvas))
        self.start_block(0)

    def start_block(self, index: int) -> None:
        """Point the step at block ``index``: its columns and rows, its query window, its per-step counts."""
        device = self.block_cols.device
        if index and self.soft_mask is not None:
            # The finished block leaves the SM window with plain embeddings (even a position still holding the mask
            # token, where the model predicted the mask token itself).
            width = self.embeds.shape[-1]
            plain = self.embedding[self.canvas.gather(1, self.window)]
            self.embeds.scatter_(1, self.window.unsqueeze(-1).expand(-1, -1, width), plain)
        start = self.decode_from + index * self.block_length
        self._block_start = start
        cols = torch.arange(start, start + self.block_length, device=device)
        self.block_cols.copy_(cols)
        self.full_rows.copy_(prediction_row_index(cols, self.shift).expand(self.batch, -1))
        if self.cache is not None:
            # Fast-dLLM's Dream loop starts the window at the block (its first position is decided by then).
            first = start if self.options.fast_dllm_compat else max(start - self.shift, 0)
            end = self.total if self.options.cache == "prefix" else start + self.block_length
            length = end - first
            if length not in self._query_buffers:
                self._query_buffers[length] = (
                    torch.empty(length, dtype=torch.int64, device=device),
                    torch.empty(self.batch, self.block_length, dtype=torch.int64, device=device),
                )
            query_cols, query_rows = self._query_buffers[length]
            query_cols.copy_(torch.arange(first, end, device=device))
            query_rows.copy_((prediction_row_index(cols, self.shift).clamp_min(first) - first).expand(self.batch, -1))
            self._query = (query_cols, query_rows)
        self.block_step.zero_()
        left = (self.canvas.gather(1, self.window) == self.options.mask_token_id).sum(-1, keepdim=True)
        self.block_initial.copy_(left.clamp_min(1))
        if self.options.llada:
            # LLaDA's get_num_transfer_tokens: the block's masks split evenly, the remainder to the first steps.
            steps = self.steps_per_block
            order = torch.arange(steps, device=device)
            self.block_counts.copy_(left // steps + (order < left % steps).long())

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
        hooked = tokens_hook is not None or logits_hook is not None
        if hooked and self.cache is not None:
            name = "generation_tokens_hook_func" if tokens_hook is not None else "generation_logits_hook_func"
            raise ValueError(
                f"{name} needs cache='none': hooks see and edit the full sequence, which a K/V cache would leave stale"
            )
        self.load(prompt, tokens_hook)
        history: list[Tensor] | None = [] if output_history else None
        for index in range(self.num_blocks):
            if index:
                self.start_block(index)
            threshold = self.options.threshold is not None
            # A threshold step unmasks at least one position while any is masked: at most W steps per block.
            steps = self.block_length if threshold else self.steps_per_block
            for i in range(steps):
                if hooked:
                    self._hooked_step(i, tokens_hook, logits_hook)
                else:
                    self._advance("full" if self.cache is None else "window" if i else "fill")
                _record(history, self.canvas)
                if threshold and not bool(
                    (self.canvas.narrow(1, self._block_start, self.block_length) == self.options.mask_token_id).any()
                ):
                    break  # the one host read: this block is decoded
        return self.canvas.clone(), history

    def _advance(self, kind: str) -> None:
        """Draw the step's noise and run the step: eagerly, or by replaying (first capturing) its CUDA graph."""
        self.noise.draw()
        if not self.cuda_graph:
            self.step(kind)
            return
        key = (kind, 0 if kind != "window" else self._query[0].numel())
        graph = self._graphs.get(key)
        if graph is None:
            # The first step of each shape runs eagerly, on a side stream: it warms up lazy initialisation (cuBLAS
            # handles, rotary tables) as capture requires, and does real work instead of a throw-away warm-up.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(kind)
            torch.cuda.current_stream().wait_stream(side)
            self._graphs[key] = self._capture(kind)
        elif graph:
            graph.replay()
        else:
            self.step(kind)

    def _capture(self, kind: str) -> torch.cuda.CUDAGraph | bool:
        """The step as a CUDA graph over the static buffers, or False (eager from then on) if capture fails."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.step(kind)
        except RuntimeError as e:  # capture only records, so the buffers are untouched: carry on eagerly
            warnings.warn(f"CUDA graph capture failed ({e}); decoding eagerly", RuntimeWarning, stacklevel=4)
            return False
        return graph

    # ------------------------------------------------------------------ hooks (eager)
    def _hooked_step(self, i: int, tokens_hook: TokensHook | None, logits_hook: LogitsHook | None) -> None:
        """A step in Dream's form: full aligned logits go to the hooks, then unmasking, then SM."""
        self.noise.draw()
        logits = align_logits(self.logits("full", None), self.shift)
        if logits_hook is not None:
            logits = logits_hook(i, self.canvas, logits)
            if not isinstance(logits, Tensor) or logits.shape[:2] != self.canvas.shape:
                raise TypeError("generation_logits_hook_func must return logits of shape [B, T, V]")
        block_logits = logits.narrow(1, self._block_start, self.block_length)
        self._unmask(block_logits)
        if tokens_hook is not None:
            self._apply_tokens_hook(tokens_hook, i, logits)
        if self.soft_mask is not None:
            self.soft_embeddings(block_logits)

    def _apply_tokens_hook(self, hook: TokensHook, i: int | None, logits: Tensor | None) -> None:
        out = hook(i, self.canvas, logits)
        if not isinstance(out, Tensor) or out.shape != self.canvas.shape:
            raise TypeError(f"generation_tokens_hook_func must return a canvas of shape {list(self.canvas.shape)}")
        if out is not self.canvas:
            self.canvas.copy_(out)
        if self.soft_mask is not None and i is not None:
            # The hook may have edited any position: keep the embeddings outside the block in step with the canvas
            # (the block's are rebuilt after the hook).
            self.embeds.copy_(self.model.get_input_embeddings()(self.canvas))


def _record(history: list[Tensor] | None, canvas: Tensor) -> None:
    if history is not None:
        history.append(canvas.clone())
