"""The learnable soft-masking (SM) parameters and the input-embedding builder.

For a position that is still masked, SM feeds the model

    e = (1 - lam) * E[mask] + lam * sum_{i in topk(p)} pi_i * E[v_i],   lam = w_s * sigmoid(w_a * (negH - w_b))

where ``p`` is the previous prediction for that position, ``pi`` its probabilities renormalised over the top-k,
and ``negH = sum p log p`` (Hersche et al., *Soft-Masked Diffusion Language Models*, arXiv 2510.17206). Every
other position gets its plain token embedding.

The builder issues one fixed-shape call of each kernel for all the rows it is given: positions that are not
masked are folded into the same blend with ``lam = 0``, so no data-dependent indexing happens and the whole
thing can be captured in a CUDA graph.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .model.family import prediction_row_index

__all__ = [
    "SoftMask",
    "ALGS",
    "SCHEDULES",
    "CONFIG_FILENAME",
    "BINARY_ALG",
    "binary_transparency_config",
    "write_transparency_config",
]

ALGS = ("mixinputs_with_topk", "mixinputs_with_temp")
#: ``transparency_alg`` of a binary (no soft-masking) model: the authors' binary runs write exactly
#: ``{"transparency_alg": "none"}``, and their decoding treats it as plain masks.
BINARY_ALG = "none"
SCHEDULES = ("none", "linear", "stepwise")
CONFIG_FILENAME = "transparency_config.json"

_EPS = 1e-6  # keeps the reparameterised values strictly inside their ranges (the authors' choice)

# The authors' transparency_config.json keys, mapped to our constructor's arguments.
_CONFIG_KEYS = {
    "transparency_alg": "alg",
    "transparency_scale": "scale",
    "transparency_centre": "centre",
    "transparency_steepness": "steepness",
    "mixinputs_k": "k",
    "mixture_temp": "temperature",
    "transparency_scheduling": "schedule",
}


def _softplus_inv(y: float) -> float:
    """x with softplus(x) = y, for y > 0 (stable for small and large y)."""
    return y + math.log(-math.expm1(-y))


def _fp32_value(t: Tensor) -> float:
    """A scalar parameter as a Python float, rounded to 6 significant digits (fp32 holds about 7: 0.3, not
    0.30000001)."""
    return float(f"{t.detach().item():.6g}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"soft mask: {name} must be a finite number, got {value!r}")
    return float(value)


class SoftMask(nn.Module):
    """Soft-masking parameters (``scale``, ``steepness``, ``centre``, ``temperature``) and the SM blend.

    Args:
        k: number of predicted tokens blended into a masked position (1 for the coding models, 3 for language
            modelling), ``1 <= k <= 32``. Used by ``mixinputs_with_topk``.
        alg: ``"mixinputs_with_topk"`` (blend of the top-k tokens) or ``"mixinputs_with_temp"`` (blend over the
            whole vocabulary at the learned temperature; dense by definition, reported as not better).
        schedule: inference-only schedule on ``scale`` with ``t`` = masks left / masks at the start:
            ``"none"``, ``"linear"`` (``scale * t``) or ``"stepwise"`` (``scale`` if ``t > 0.5`` else 0).
        scale: initial ``w_s`` in [0, 1]; 0 (the paper's initialisation) is stored as ``1e-6``.
        steepness: initial ``w_a`` > 0.
        centre: initial ``w_b`` < 0.
        temperature: initial ``tau`` > 0 (``mixinputs_with_temp`` only).

    The parameters are fp32 scalars stored unconstrained (``raw_*``) and mapped into range by sigmoid/softplus,
    so an optimiser can never push them out of it.
    """

    def __init__(
        self,
        k: int = 1,
        alg: str = "mixinputs_with_topk",
        schedule: str = "none",
        scale: float = 0.0,
        steepness: float = 10.0 / 1.5,
        centre: float = -0.75,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if alg not in ALGS:
            raise ValueError(f"soft mask: unknown alg {alg!r}; expected one of {ALGS}")
        if schedule not in SCHEDULES:
            raise ValueError(f"soft mask: unknown schedule {schedule!r}; expected one of {SCHEDULES}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= ops.MAX_K:
            raise ValueError(f"soft mask: k must be an int in [1, {ops.MAX_K}], got {k!r}")
        scale, steepness = _number("scale", scale), _number("steepness", steepness)
        centre, temperature = _number("centre", centre), _number("temperature", temperature)
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"soft mask: scale must lie in [0, 1], got {scale}")
        if steepness <= _EPS:
            raise ValueError(f"soft mask: steepness must be > {_EPS}, got {steepness}")
        if centre >= -_EPS:
            raise ValueError(f"soft mask: centre must be < {-_EPS}, got {centre}")
        if temperature <= _EPS:
            raise ValueError(f"soft mask: temperature must be > {_EPS}, got {temperature}")
        self.k, self.alg, self.schedule = k, alg, schedule
        s = min(max(scale, _EPS), 1.0 - _EPS)
        self.raw_scale = nn.Parameter(torch.tensor(math.log(s / (1.0 - s))))
        self.raw_steepness = nn.Parameter(torch.tensor(_softplus_inv(steepness - _EPS)))
        self.raw_centre = nn.Parameter(torch.tensor(_softplus_inv(-centre - _EPS)))
        self.raw_temperature = nn.Parameter(torch.tensor(_softplus_inv(temperature - _EPS)))

    # --- constrained parameters --------------------------------------------------------------------------
    @property
    def scale(self) -> Tensor:
        """``w_s`` in (0, 1): the largest share of the prediction a masked position can receive."""
        return torch.sigmoid(self.raw_scale)

    @property
    def steepness(self) -> Tensor:
        """``w_a`` > 0: slope of the sigmoid in the confidence."""
        return F.softplus(self.raw_steepness) + _EPS

    @property
    def centre(self) -> Tensor:
        """``w_b`` < 0: the negative entropy at which ``lam`` reaches half of ``scale``."""
        return -F.softplus(self.raw_centre) - _EPS

    @property
    def temperature(self) -> Tensor:
        """``tau`` > 0: softmax temperature of the full-vocabulary variant."""
        return F.softplus(self.raw_temperature) + _EPS

    # --- the mixing weight ---------------------------------------------------------------------------------
    def lam(self, neg_entropy: Tensor, progress: float | Tensor | None = None) -> Tensor:
        """Mixing weight ``lam = scale * f(t) * sigmoid(steepness * (negH - centre))``, fp32, shape of ``neg_entropy``.

        ``progress`` is ``t`` = masks left / masks at the start (a float, or a tensor broadcastable to
        ``neg_entropy``); it only matters for the ``linear`` and ``stepwise`` schedules, and ``None`` means no
        schedule (training).
        """
        scale = self.scale
        if progress is not None and self.schedule != "none":
            # A tensor progress stays on the device (no host sync inside a decoding step).
            t = progress.float() if isinstance(progress, Tensor) else float(progress)
            stepped = (t > 0.5).float() if isinstance(t, Tensor) else float(t > 0.5)
            scale = scale * (t if self.schedule == "linear" else stepped)
        return scale * torch.sigmoid(self.steepness * (neg_entropy.float() - self.centre))

    # --- embedding builders --------------------------------------------------------------------------------
    def soft_rows(
        self,
        logits: Tensor,
        rows: Tensor | None,
        input_ids: Tensor,
        embedding_weight: Tensor,
        mask_token_id: int,
        progress: float | Tensor | None = None,
    ) -> Tensor:
        """Input embeddings for ``R`` positions from their predictions.

        Args:
            logits: ``[..., V]`` the previous pass's logits (any float dtype; treated as constants).
            rows: int64 ``[R]``: for each position, the row of ``logits.reshape(-1, V)`` that predicts it
                (already aligned by the model family's ``logit_shift``); ``None`` when row ``r`` of ``logits``
                already predicts position ``r``.
            input_ids: int64 ``[R]``: the current token at each position; positions holding ``mask_token_id``
                get the soft blend, all others their plain embedding.
            embedding_weight: ``[V, D]`` the input embedding table.
            mask_token_id: id of the mask token.
            progress: schedule input ``t`` (see :meth:`lam`), a float or a tensor broadcastable to ``[R]``.

        Returns:
            ``[R, D]`` in ``embedding_weight.dtype``; differentiable w.r.t. the table and the SM parameters.
        """
        is_mask = input_ids == mask_token_id
        if rows is None:
            logits = logits.reshape(-1, logits.shape[-1])  # [R, V]: outputs then come out [R, ...] like input_ids
        if self.alg == "mixinputs_with_temp":
            return self._soft_rows_full_vocab(logits, rows, input_ids, embedding_weight, is_mask, progress)
        if rows is None:
            rows = torch.arange(input_ids.numel(), device=input_ids.device)
        # Only masked positions blend their prediction: the kernel skips the others' rows (zeros out, lam is 0 there).
        rows = rows.masked_fill(~is_mask, ops.SKIP_ROW)
        topk_ids, probs, neg_entropy = ops.topk_entropy(logits, self.k, rows=rows)
        lam = self.lam(neg_entropy, progress) * is_mask
        ids = torch.cat([input_ids.unsqueeze(-1), topk_ids], dim=-1)
        coeffs = torch.cat([(1.0 - lam).unsqueeze(-1), lam.unsqueeze(-1) * probs], dim=-1)
        return ops.blend_embeddings(embedding_weight, ids, coeffs)

    def _soft_rows_full_vocab(
        self,
        logits: Tensor,
        rows: Tensor | None,
        input_ids: Tensor,
        embedding_weight: Tensor,
        is_mask: Tensor,
        progress: float | Tensor | None,
    ) -> Tensor:
        # The full-vocabulary variant mixes all V rows of the table, so it is a dense [R, V] @ [V, D] product.
        flat = logits.reshape(-1, logits.shape[-1])
        scaled = (flat if rows is None else flat[rows]).float() / self.temperature
        log_p = torch.log_softmax(scaled, dim=-1)
        p = log_p.exp()
        neg_entropy = torch.where(p == 0, torch.zeros_like(log_p), p * log_p).sum(-1)
        lam = (self.lam(neg_entropy, progress) * is_mask).unsqueeze(-1)
        plain = embedding_weight[input_ids].float()
        mixed = p.to(embedding_weight.dtype) @ embedding_weight
        return ((1.0 - lam) * plain + lam * mixed.float()).to(embedding_weight.dtype)

    def build_embeddings(
        self,
        input_ids: Tensor,
        logits: Tensor,
        embedding_weight: Tensor,
        mask_token_id: int,
        logit_shift: int,
        progress: float | Tensor | None = None,
    ) -> Tensor:
        """Input embeddings of a whole sequence from the previous pass's logits.

        Args:
            input_ids: int64 ``[B, T]`` current tokens (``mask_token_id`` where masked).
            logits: ``[B, T, V]`` raw logits of the previous pass over the same sequence.
            embedding_weight: ``[V, D]`` the input embedding table.
            mask_token_id: id of the mask token.
            logit_shift: the model family's (``family_of(model).logit_shift``): 1 when the prediction for
                position ``i`` is logits row ``i - 1`` (row 0 for position 0; Dream), 0 when it is row ``i`` (LLaDA).
            progress: schedule input, a float or a tensor broadcastable to ``[B, T]`` (e.g. ``[B, 1]``).

        Returns:
            ``[B, T, D]`` in ``embedding_weight.dtype``.
        """
        if input_ids.dim() != 2 or logits.shape[:2] != input_ids.shape:
            raise ValueError(
                f"build_embeddings: expected input_ids [B, T] and logits [B, T, V], got {tuple(input_ids.shape)} "
                f"and {tuple(logits.shape)}"
            )
        batch, length = input_ids.shape
        pos = prediction_row_index(torch.arange(length, device=input_ids.device), logit_shift)
        rows = (torch.arange(batch, device=input_ids.device)[:, None] * length + pos).reshape(-1)
        if isinstance(progress, Tensor):
            progress = torch.broadcast_to(progress, (batch, length)).reshape(-1)
        out = self.soft_rows(logits, rows, input_ids.reshape(-1), embedding_weight, mask_token_id, progress)
        return out.reshape(batch, length, -1)

    # --- the authors' transparency_config.json ------------------------------------------------------------
    @classmethod
    def from_transparency_config(cls, config: Mapping[str, Any] | str | os.PathLike) -> SoftMask | None:
        """Build from the authors' ``transparency_config.json`` (a dict or a path to the file or its folder).

        Returns ``None`` (binary decoding) when ``transparency_alg`` is ``"none"``, as the authors' decoding does; the
        other keys of such a config are checked as usual but mean nothing.
        """
        if isinstance(config, (str, os.PathLike)):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, CONFIG_FILENAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"soft mask: no transparency config at {path}")
            with open(path, encoding="utf-8") as f:
                try:
                    config = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"soft mask: {path} is not valid JSON: {e}") from None
        if not isinstance(config, Mapping):
            raise TypeError(f"soft mask: a transparency config must be a mapping, got {type(config).__name__}")
        unknown = sorted(set(config) - set(_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"soft mask: unknown transparency config keys {unknown}; known: {sorted(_CONFIG_KEYS)}")
        if config.get("transparency_alg") == BINARY_ALG:
            return None
        return cls(**{_CONFIG_KEYS[key]: value for key, value in config.items()})

    def to_transparency_config(self) -> dict[str, Any]:
        """The current values in the authors' ``transparency_config.json`` format."""
        return {
            "transparency_alg": self.alg,
            "transparency_scale": _fp32_value(self.scale),
            "transparency_centre": _fp32_value(self.centre),
            "transparency_steepness": _fp32_value(self.steepness),
            "mixinputs_k": self.k,
            "mixture_temp": _fp32_value(self.temperature),
            "transparency_scheduling": self.schedule,
        }

    def save_transparency_config(self, path: str | os.PathLike) -> str:
        """Write ``transparency_config.json`` (``path`` is the file or its folder); returns the file's path."""
        return write_transparency_config(path, self)

    @classmethod
    def beside(cls, model_dir: str | os.PathLike) -> SoftMask | None:
        """The soft-mask of the ``transparency_config.json`` in a model folder (fine-tuning writes one into its run
        and ``final/`` folders), or ``None`` when there is none: what ``generate`` and ``evaluate`` decode with
        unless told otherwise."""
        path = os.path.join(os.fspath(model_dir), CONFIG_FILENAME)
        return cls.from_transparency_config(path) if os.path.isfile(path) else None

    @classmethod
    def from_any(
        cls, soft_mask: SoftMask | Mapping[str, Any] | str | os.PathLike | None = None, **kwargs: Any
    ) -> SoftMask | None:
        """A :class:`SoftMask` from whatever a user hands a decoding or evaluation call.

        Accepts a ``SoftMask`` (returned as is), a transparency-config dict, a path to the JSON file or its
        folder, or the authors' keywords (``transparency_alg=..., transparency_scale=..., mixinputs_k=...``).
        Returns ``None`` (binary decoding) when given nothing or ``transparency_alg="none"``.
        """
        if soft_mask is not None and kwargs:
            raise ValueError("soft mask: pass either soft_mask or transparency_* keywords, not both")
        if kwargs:
            return cls.from_transparency_config(kwargs)
        if soft_mask is None or isinstance(soft_mask, SoftMask):
            return soft_mask
        return cls.from_transparency_config(soft_mask)

    def extra_repr(self) -> str:
        values = ", ".join(
            f"{k}={_fp32_value(getattr(self, k)):.4g}" for k in ("scale", "steepness", "centre", "temperature")
        )
        return f"alg={self.alg}, k={self.k}, schedule={self.schedule}, {values}"


def binary_transparency_config() -> dict[str, Any]:
    """The ``transparency_config.json`` of a binary model: exactly what the authors' binary runs write."""
    return {"transparency_alg": BINARY_ALG}


def write_transparency_config(path: str | os.PathLike, soft_mask: SoftMask | None) -> str:
    """Write ``transparency_config.json`` for ``soft_mask``, or the binary config for ``None``; ``path`` is the file
    or its folder. Returns the file's path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_FILENAME)
    config = binary_transparency_config() if soft_mask is None else soft_mask.to_transparency_config()
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return path
