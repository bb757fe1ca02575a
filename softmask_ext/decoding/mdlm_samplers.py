"""MDLM's ancestral sampler and ReMDM's remasking samplers, with soft-masking (SM) between steps.

A run keeps a canvas ``[B, P + N]``: an optional fixed prefix of ``P`` tokens (MDLM samples unconditionally, ``P =
0``) and a region of ``N`` positions that starts fully masked. With ``timesteps = linspace(1, eps, steps + 1)`` and
``dt = (1 - eps) / steps``, every step ``i`` (``t = timesteps[i]``, ``s = t - dt``) draws each region position from a
categorical over the vocabulary whose token classes are ``A * p`` and whose mask class is ``B``, where ``p`` are the
SUBS probabilities of the last forward pass (after the optional nucleus cut) and ``(A, B)`` depend on the step and on
whether the position is masked:

- ``mdlm`` (MDLM's ancestral update): masked ``(t - s, s)``; unmasked positions keep their token;
- ``remdm-cap`` (ReMDM, remasking capped): with ``alpha_t = 1 - t``, ``alpha_s = 1 - s`` and
  ``sigma = min(eta, (1 - alpha_s) / alpha_t)``: unmasked ``(1 - sigma, sigma)`` (each unmasked token is remasked
  with probability ``sigma``), masked ``((alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t),
  (1 - alpha_s - sigma alpha_t) / (1 - alpha_t))``;
- ``remdm-loop`` (ReMDM's loop): MDLM's update on a schedule that reaches ``alpha_on`` at ``t_on``, a loop of
  remasking at constant ``alpha_on`` (``sigma = eta``) while ``t_off < t <= t_on``, then MDLM's update down to 0.

Sampling is MDLM's: the class maximising ``q / E`` with ``E = 1e-10 - log(u + 1e-10)`` and uniform ``u`` (fp64), an
exponential race, i.e. a draw from ``q / sum(q)``. MDLM skips the forward pass of a step when the previous step
changed nothing (the model would see the same input; ``cache``); the caller's loop reads one flag per step for that,
between steps. A final forward pass replaces every remaining mask by its most probable token (``noise_removal``).

With SM, every forward pass after the first takes, at the masked positions, the SM blend built from the SUBS
log-probabilities of the previous forward pass (a remasked position thus sees its former token); the final
noise-removal pass is an SM pass too.

The two parts of a step (:meth:`MDLMSampler.forward_part`, :meth:`MDLMSampler.update_part`) run on static buffers
with fixed shapes and no host sync, and are captured as CUDA graphs on CUDA. The per-step coefficients are computed
once on the host, in fp32 with the reference's expressions, so samples match MDLM's and ReMDM's code token for token
for the same noise.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..model.family import family_of
from ..model.mdlm import subs_log_probs
from ..soft_mask import SoftMask

__all__ = [
    "REMDM_SCHEDULES",
    "SAMPLERS",
    "MDLMSampler",
    "MDLMSamplerOptions",
    "generate_from_diffusion_api",
    "is_mdlm_model",
    "mdlm_generate",
    "nucleus",
    "step_coefficients",
]

REMDM_SCHEDULES = ("cap", "loop")
SAMPLERS = ("mdlm", *(f"remdm-{name}" for name in REMDM_SCHEDULES))
#: ReMDM's published settings (OpenWebText, 1024 tokens): eta per schedule, and the loop's window.
REMDM_ETA = {"remdm-cap": 0.008, "remdm-loop": 0.02}
_GUMBEL_EPS = 1e-10


@dataclass(frozen=True)
class MDLMSamplerOptions:
    """Settings of an MDLM/ReMDM sampling run.

    Attributes:
        steps: sampling steps (>= 1; may exceed the number of tokens).
        sampler: ``"mdlm"``, ``"remdm-cap"`` or ``"remdm-loop"``.
        eps: final time of ``linspace(1, eps, steps + 1)`` (MDLM's 1e-5).
        eta: ReMDM's remasking rate (None: ReMDM's published 0.008 for cap, 0.02 for loop).
        t_on, t_off, alpha_on: ReMDM loop's window and the signal level held inside it.
        nucleus_p: keep the most probable tokens whose cumulative probability stays within ``nucleus_p`` (at
            least one), as ReMDM does; 1.0 keeps all.
        noise_removal: a final forward pass fills the remaining masks with their argmax.
        cache: skip the forward pass of a step when the previous step changed nothing (MDLM's ``ddpm_cache``).
    """

    steps: int
    sampler: str = "mdlm"
    eps: float = 1e-5
    eta: float | None = None
    t_on: float = 0.55
    t_off: float = 0.05
    alpha_on: float = 0.9
    nucleus_p: float = 1.0
    noise_removal: bool = True
    cache: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        if self.sampler not in SAMPLERS:
            detail = ""
            if str(self.sampler).startswith("remdm-"):
                detail = f" (ReMDM schedule {str(self.sampler)[6:]!r} does not exist; ReMDM's are {REMDM_SCHEDULES})"
            raise ValueError(f"unknown sampler {self.sampler!r}{detail}; expected one of {SAMPLERS}")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps must lie in (0, 1), got {self.eps!r}")
        if self.eta is None:
            object.__setattr__(self, "eta", REMDM_ETA.get(self.sampler, 0.0))
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {self.eta!r}")
        if not 0.0 < self.nucleus_p <= 1.0:
            raise ValueError(f"nucleus_p must lie in (0, 1], got {self.nucleus_p!r}")
        if self.sampler == "remdm-loop" and not (0.0 < self.t_off < self.t_on < 1.0 and 0.0 < self.alpha_on < 1.0):
            raise ValueError(
                f"remdm-loop needs 0 < t_off < t_on < 1 and 0 < alpha_on < 1, got t_on={self.t_on}, "
                f"t_off={self.t_off}, alpha_on={self.alpha_on}"
            )


def timesteps(options: MDLMSamplerOptions) -> Tensor:
    """fp32 ``[steps + 1]``: ``linspace(1, eps, steps + 1)`` on the CPU (the reference's values)."""
    return torch.linspace(1, options.eps, options.steps + 1)


def step_coefficients(options: MDLMSamplerOptions) -> Tensor:
    """fp32 ``[steps, 4]``: per step ``(A, B)`` for masked positions, then ``(A, B)`` for unmasked ones.

    Token classes get ``A * p``, the mask class ``B`` (see the module docstring). MDLM's update keeps unmasked
    tokens, which is ``(1, 0)`` on their carried-over one-hot ``p``.
    """
    ts, dt = timesteps(options), (1 - options.eps) / options.steps
    rows = []
    for i in range(options.steps):
        t = ts[i : i + 1]
        rows.append(_coefficients(options, t, dt))
    return torch.tensor(rows, dtype=torch.float32)


def _coefficients(options: MDLMSamplerOptions, t: Tensor, dt: float) -> list[float]:
    """The ``(A_masked, B_masked, A_unmasked, B_unmasked)`` of one step, in the reference's fp32 arithmetic."""
    eta, t_on, t_off, alpha_on = options.eta, options.t_on, options.t_off, options.alpha_on

    def ancestral(move_t: Tensor, move_s: Tensor) -> list[float]:
        return [float(move_t - move_s), float(move_s), 1.0, 0.0]

    def remasking(alpha_t: float, alpha_s: float, sigma: float) -> list[float]:
        return [
            _fp32((alpha_s - (1 - sigma) * alpha_t) / (1 - alpha_t)),
            _fp32((1 - alpha_s - sigma * alpha_t) / (1 - alpha_t)),
            _fp32(1 - sigma),
            _fp32(sigma),
        ]

    if options.sampler == "mdlm":
        return ancestral(t, t - dt)
    if options.sampler == "remdm-cap":
        alpha_t, alpha_s = float(1 - t), float(1 - (t - dt))
        sigma = min(eta, (1 - alpha_s) / alpha_t) if alpha_t > 0 else eta
        return remasking(alpha_t, alpha_s, sigma)
    time = float(t)
    if time > t_on:
        return ancestral(1 - (1 - t) * alpha_on / (1 - t_on), 1 - (1 - t + dt) * alpha_on / (1 - t_on))
    if time <= t_off:
        return ancestral(t * (1 - alpha_on) / t_off, (t - dt) * (1 - alpha_on) / t_off)
    return remasking(alpha_on, alpha_on, eta)


def _fp32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def nucleus(p: Tensor, top_p: float) -> Tensor:
    """ReMDM's nucleus: in each row keep the largest probabilities whose running sum stays ``<= top_p`` (the largest
    always), renormalised; ``p`` [..., V] fp32. Fixed shapes (a full sort), so capturable."""
    sorted_p, order = torch.sort(p, dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) <= top_p
    keep[..., 0] = True
    kept = sorted_p * keep
    return torch.zeros_like(p).scatter_(-1, order, kept / kept.sum(-1, keepdim=True))


class MDLMSampler:
    """Static buffers and the two step parts of MDLM/ReMDM sampling runs of one shape.

    Args:
        model: an MDLM-family model (``forward(input_ids=/inputs_embeds=, position_ids=, logits_rows=, sigma=)``,
            ``config.mask_token_id``, ``get_input_embeddings()``).
        options: the sampler settings.
        batch, prompt_len, new_tokens: ``B``, ``P``, ``N`` of the canvas ``[B, P + N]``.
        soft_mask: the SM module on the model's device, or None (binary masks).
        generator: source of the sampling noise (None: torch's default generator of the device).
        cuda_graph: capture both step parts as CUDA graphs (None: when the model is on CUDA).
    """

    def __init__(
        self,
        model: nn.Module,
        options: MDLMSamplerOptions,
        *,
        batch: int,
        prompt_len: int,
        new_tokens: int,
        soft_mask: SoftMask | None = None,
        generator: torch.Generator | None = None,
        cuda_graph: bool | None = None,
    ) -> None:
        config = model.config
        embedding = model.get_input_embeddings().weight
        device = embedding.device
        total = prompt_len + new_tokens
        if new_tokens < 1:
            raise ValueError(f"the number of tokens to sample must be >= 1, got {new_tokens}")
        if total > config.model_length:
            raise ValueError(
                f"prompt length {prompt_len} + {new_tokens} new tokens = {total} exceeds the model's "
                f"length of {config.model_length}"
            )
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a model on a CUDA device, this one is on {device}")
        self.model, self.options, self.soft_mask, self.generator = model, options, soft_mask, generator
        self.cuda_graph, self._graphs = cuda_graph, None
        self.mask_token_id = config.mask_token_id
        self.batch, self.prompt_len, self.length = batch, prompt_len, new_tokens
        self.embedding = embedding
        vocab = config.vocab_size
        self.coefficients = step_coefficients(options).to(device)
        ts = timesteps(options)
        # MDLM's conditioning sigma_t = -log(alpha_t) of the log-linear schedule; the last entry is the noise-removal
        # pass's. Only read by time-conditioned models.
        self.sigmas = (-torch.log1p(-(1 - 1e-3) * ts)).to(device)
        self.time_conditioned = bool(config.time_conditioning)
        self.step_index = torch.zeros(1, dtype=torch.int64, device=device)
        self.canvas = torch.empty(batch, total, dtype=torch.int64, device=device)
        self.position_ids = torch.arange(total, device=device).expand(batch, total).contiguous()
        self.logits_rows = torch.arange(prompt_len, total, device=device).expand(batch, -1).contiguous()
        self.log_p = torch.empty(batch, new_tokens, vocab, dtype=torch.float32, device=device)
        self.p = torch.empty_like(self.log_p)
        self.uniform = torch.empty(batch, new_tokens, vocab, dtype=torch.float64, device=device)
        self.changed = torch.zeros((), dtype=torch.bool, device=device)
        self.initial_masks = torch.ones(batch, 1, device=device)
        if soft_mask is not None:
            self.embeds = torch.empty(batch, total, embedding.shape[1], dtype=embedding.dtype, device=device)

    @property
    def region(self) -> Tensor:
        """View ``[B, N]`` of the sampled region of the canvas."""
        return self.canvas[:, self.prompt_len :]

    # ------------------------------------------------------------------ the step parts
    def forward_part(self, soft: bool = True) -> None:
        """One forward pass: SM inputs (when ``soft`` and an SM module is set) from the previous log-probabilities,
        then SUBS log-probabilities into ``log_p`` and the (nucleus-cut) probabilities into ``p``. Capturable."""
        inputs: dict[str, Tensor] = {"input_ids": self.canvas}
        if soft and self.soft_mask is not None:
            region = self.region
            progress = None
            if self.soft_mask.schedule != "none":
                left = (region == self.mask_token_id).sum(-1, keepdim=True)
                progress = (left / self.initial_masks).expand_as(region).reshape(-1)
            rows = self.soft_mask.soft_rows(
                self.log_p, None, region.reshape(-1), self.embedding, self.mask_token_id, progress
            )
            self.embeds[:, self.prompt_len :] = rows.view(self.batch, self.length, -1)
            inputs = {"inputs_embeds": self.embeds}
        sigma = self.sigmas.index_select(0, self.step_index).expand(self.batch) if self.time_conditioned else None
        logits = self.model(
            **inputs,
            position_ids=self.position_ids,
            logits_rows=self.logits_rows,
            **({"sigma": sigma} if sigma is not None else {}),
        ).logits
        self.log_p.copy_(subs_log_probs(logits, self.region, self.mask_token_id))
        p = self.log_p.exp()
        self.p.copy_(nucleus(p, self.options.nucleus_p) if self.options.nucleus_p < 1.0 else p)

    def update_part(self) -> None:
        """Sample the region from ``p`` and this step's coefficients with the noise in ``uniform``; sets
        ``changed``. Capturable."""
        region = self.region
        is_mask = region == self.mask_token_id
        coef = self.coefficients.index_select(0, self.step_index).squeeze(0)
        scale = torch.where(is_mask, coef[0], coef[2]).unsqueeze(-1)
        mask_mass = torch.where(is_mask, coef[1], coef[3])
        q = self.p * scale
        q[..., self.mask_token_id] = mask_mass
        race = _GUMBEL_EPS - (self.uniform + _GUMBEL_EPS).log()
        sampled = (q.double() / race).argmax(-1)
        self.changed.copy_((sampled != region).any())
        region.copy_(sampled)
        self.step_index += 1

    def draw_noise(self) -> None:
        """Fill ``uniform`` for the next update (outside the graphs, from the caller's generator)."""
        self.uniform.uniform_(generator=self.generator)

    # ------------------------------------------------------------------ runs
    def load(self, prompt: Tensor | None) -> None:
        """Prefix ``[B, P]`` (or None when ``P == 0``) + ``N`` masks; step 0; plain embeddings."""
        if self.prompt_len:
            self.canvas[:, : self.prompt_len] = prompt
        self.canvas[:, self.prompt_len :] = self.mask_token_id
        self.step_index.zero_()
        self.initial_masks.fill_(self.length)
        if self.soft_mask is not None:
            self.embeds.copy_(self.model.get_input_embeddings()(self.canvas))

    @torch.no_grad()
    def run(self, prompt: Tensor | None = None) -> tuple[Tensor, int]:
        """Sample; returns the canvas ``[B, P + N]`` and the number of forward passes (caching skips some)."""
        self.load(prompt)
        opts = self.options
        skip_allowed = opts.cache and not self.time_conditioned
        forwards, recompute = 0, True
        for i in range(opts.steps):
            if recompute:
                self.run_part("forward", soft=i > 0)
                forwards += 1
            self.draw_noise()
            self.run_part("update")
            # One read per step, between steps (not inside one): whether the next step needs a forward pass.
            recompute = not skip_allowed or bool(self.changed)
        if opts.noise_removal:
            self.run_part("forward", soft=True)
            forwards += 1
            self.region.copy_(self.log_p.argmax(-1))
        return self.canvas.clone(), forwards

    def run_part(self, part: str, soft: bool = True) -> None:
        """Run one part of a step (``"forward"`` or ``"update"``): replayed from its CUDA graph when captured."""
        if not self.cuda_graph or not soft:
            # Eager: on the CPU, and for the first (plain) forward pass, which also warms up lazy state.
            self.forward_part(soft) if part == "forward" else self.update_part()
            return
        if self._graphs is None:
            self._graphs = {}
        graph = self._graphs.get(part)
        if graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside capture, on copies of the state it would change
                saved = (self.canvas.clone(), self.step_index.clone(), self.log_p.clone(), self.p.clone())
                self.forward_part(True) if part == "forward" else self.update_part()
                for buffer, value in zip((self.canvas, self.step_index, self.log_p, self.p), saved):
                    buffer.copy_(value)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.forward_part(True) if part == "forward" else self.update_part()
            self._graphs[part] = graph
        graph.replay()


def mdlm_generate(
    model: nn.Module,
    input_ids: Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    steps: int | None = None,
    sampler: str = "mdlm",
    eps: float = 1e-5,
    eta: float | None = None,
    t_on: float = 0.55,
    t_off: float = 0.05,
    alpha_on: float = 0.9,
    nucleus_p: float = 1.0,
    noise_removal: bool = True,
    cache: bool = True,
    soft_mask: SoftMask | Mapping[str, Any] | str | os.PathLike | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    cuda_graph: bool | None = None,
    return_forward_count: bool = False,
    **soft_mask_kwargs: Any,
) -> Tensor | tuple[Tensor, int]:
    """Sample from an MDLM-family model with MDLM's or ReMDM's sampler, optionally soft-masked.

    Args:
        model: an :class:`softmask_ext.model.mdlm.MDLMModel` (or a module with its interface).
        input_ids: int64 ``[B, P]`` fixed prefixes (no mask tokens), or None for unconditional samples.
        max_new_tokens: ``N``, tokens sampled after the prefix (default: up to the model's length).
        batch_size: ``B`` when ``input_ids`` is None (default 1).
        steps: sampling steps >= 1 (default ``N``).
        sampler, eps, eta, t_on, t_off, alpha_on, nucleus_p, noise_removal, cache: see :class:`MDLMSamplerOptions`.
        soft_mask: a :class:`SoftMask`, a ``transparency_config`` dict or a path to one, or the authors' keywords;
            None: binary masks.
        generator, seed: source of randomness (one or neither).
        cuda_graph: capture the step parts as CUDA graphs (default: on CUDA).
        return_forward_count: also return the number of forward passes run.

    Returns:
        int64 ``[B, P + N]`` (and the forward-pass count when asked).
    """
    from .api import _generator, _soft_mask_on  # one owner of these conversions

    config = model.config
    device = model.get_input_embeddings().weight.device
    if input_ids is not None:
        if (
            not isinstance(input_ids, Tensor)
            or input_ids.dim() != 2
            or input_ids.dtype not in (torch.int64, torch.int32)
        ):
            raise ValueError("input_ids must be an int64 [batch, prefix_len] tensor")
        if batch_size is not None and batch_size != input_ids.shape[0]:
            raise ValueError(f"batch_size {batch_size} disagrees with input_ids' batch of {input_ids.shape[0]}")
        input_ids = input_ids.to(device=device, dtype=torch.int64)
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {config.vocab_size})")
        if bool((input_ids == config.mask_token_id).any()):
            raise ValueError("the prefix holds mask tokens; MDLM's samplers take a fixed prefix")
        batch, prompt_len = input_ids.shape
    else:
        batch, prompt_len = (1 if batch_size is None else batch_size), 0
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch!r}")
    if max_new_tokens is None:
        max_new_tokens = config.model_length - prompt_len
    options = MDLMSamplerOptions(
        steps=max_new_tokens if steps is None else steps,
        sampler=sampler,
        eps=eps,
        eta=eta,
        t_on=t_on,
        t_off=t_off,
        alpha_on=alpha_on,
        nucleus_p=nucleus_p,
        noise_removal=noise_removal,
        cache=cache,
    )
    runner = MDLMSampler(
        model,
        options,
        batch=batch,
        prompt_len=prompt_len,
        new_tokens=max_new_tokens,
        soft_mask=_soft_mask_on(SoftMask.from_any(soft_mask, **soft_mask_kwargs), device),
        generator=_generator(generator, seed, device),
        cuda_graph=cuda_graph,
    )
    sequences, forwards = runner.run(input_ids if prompt_len else None)
    return (sequences, forwards) if return_forward_count else sequences


def is_mdlm_model(model: nn.Module) -> bool:
    """Whether ``model`` belongs to the MDLM family (a module declaring no family is not)."""
    try:
        return family_of(model).name == "mdlm"
    except TypeError:
        return False


# Dream's decoding options and their defaults in diffusion_generate: they have no meaning for MDLM's samplers.
_DREAM_ONLY = {
    "temperature": 0.0,
    "top_k": None,
    "alg": "origin",
    "alg_temp": None,
    "output_history": False,
    "return_dict_in_generate": False,
    "generation_tokens_hook_func": None,
    "generation_logits_hook_func": None,
}


def generate_from_diffusion_api(
    model: nn.Module,
    input_ids: Tensor | None,
    attention_mask: Tensor | None,
    *,
    top_p: float | None,
    mask_token_id: int | None,
    **kwargs: Any,
) -> Tensor:
    """``diffusion_generate`` on an MDLM-family model: Dream's options that do not apply must keep their defaults;
    ``top_p`` is the nucleus; MDLM's sampler keywords (``sampler=``, ``eta=``, ...) pass through."""
    given = {k: kwargs.pop(k) for k in _DREAM_ONLY if k in kwargs}
    set_here = sorted(k for k, value in given.items() if value is not None and value != _DREAM_ONLY[k])
    if set_here:
        raise ValueError(f"{set_here} do not apply to MDLM-family models (samplers: {SAMPLERS})")
    if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
        raise ValueError("MDLM's samplers take unpadded prefixes (no attention mask with zeros)")
    if mask_token_id is not None and mask_token_id != model.config.mask_token_id:
        raise ValueError(f"mask_token_id {mask_token_id} is not the model's ({model.config.mask_token_id})")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # unset: the sampler's own defaults
    if top_p is not None:
        kwargs["nucleus_p"] = top_p
    if input_ids is not None and input_ids.shape[1] == 0:
        kwargs["batch_size"], input_ids = input_ids.shape[0], None
    return mdlm_generate(model, input_ids, **kwargs)
