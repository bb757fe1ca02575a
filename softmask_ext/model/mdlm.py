"""The MDLM family: the DiT backbone of masked diffusion language models in the MDLM line, and the SUBS
parameterisation.

The backbone is MDLM's published DiT: token embeddings, a timestep embedder whose output conditions every block
through adaLN (shift/scale/gate of each sub-layer), bidirectional attention with rotary positions (theta 10000,
pairing dimension ``i`` with ``i + head_dim/2``), a GELU(tanh) MLP of width ``4 * hidden``, and a final adaLN layer
with a biased linear head. With the time conditioning off (MDLM's default for its OpenWebText models), the noise
level fed to the timestep embedder is zero, so the adaLN terms are constant per model but still present.

Module names follow the public Hugging Face checkpoints (``kuleshov-group/mdlm-owt``): ``backbone.vocab_embed.
embedding``, ``backbone.sigma_map.mlp.{0,2}``, ``backbone.blocks.N.{norm1,attn_qkv,attn_out,norm2,mlp.{0,2},
adaLN_modulation}``, ``backbone.output_layer.{norm_final,linear,adaLN_modulation}``, with a ``config.json`` of
``model_type "mdlm"`` and the keys ``vocab_size, model_length, hidden_dim, cond_dim, n_blocks, n_heads, dropout,
time_conditioning``. Those checkpoints load here without their remote code.

SUBS (MDLM's substitution parameterisation) has two parts:

- the mask class gets ``-1e6`` added to its logit, so no prediction ever puts mass on ``[MASK]``; the model's
  ``forward`` does this, so every consumer of ``.logits`` (the SM builder, its entropy and top-k, the ELBO) sees it;
- positions that are not masked are carried over: their log-probabilities are 0 at the current token and ``-1e6``
  elsewhere. That needs the current tokens, which a forward on ``inputs_embeds`` does not have, so it is the
  separate function :func:`subs_log_probs` that the loss and the samplers apply with the canvas they hold.

There is no logit shift: row ``i`` predicts position ``i``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..conventions import MODEL_WEIGHTS
from .config import ConfigFile
from .family import ModelFamily, register_family
from .transformer import (
    DiffusionGenerateMixin,
    LMOutput,
    RotaryEmbedding,
    attention_and_positions,
    embed_inputs,
    select_rows,
    self_attention,
)

__all__ = [
    "NEG_INFINITY",
    "DiTBlock",
    "MDLMConfig",
    "MDLMModel",
    "check_tokenizer",
    "load_mdlm",
    "save_mdlm",
    "subs_log_probs",
]

#: The logit MDLM gives the mask class, and the log-probability of every other class at a carried-over position.
NEG_INFINITY = -1e6
#: GPT-2's ``<|endoftext|>``: MDLM's OpenWebText checkpoints use GPT-2's tokenizer plus one appended mask token.
GPT2_VOCAB_WITH_MASK, GPT2_EOS = 50258, 50256
ROTARY_THETA = 10_000.0
TIMESTEP_FREQUENCIES = 256  # width of the sinusoidal timestep features
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class MDLMConfig(ConfigFile):
    """Shapes and token ids of a DiT MDLM. Defaults are MDLM's 169M OpenWebText model (GPT-2 tokenizer + mask).

    ``mask_token_id`` defaults to the last id (MDLM appends the mask to the tokenizer); ``eos/bos/pad`` default to
    GPT-2's ``<|endoftext|>`` for the GPT-2-sized vocabulary and to none otherwise.
    """

    vocab_size: int = GPT2_VOCAB_WITH_MASK
    model_length: int = 1024
    hidden_dim: int = 768
    cond_dim: int = 128
    n_blocks: int = 12
    n_heads: int = 12
    dropout: float = 0.1
    time_conditioning: bool = False
    mask_token_id: int | None = None
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "model_length", "hidden_dim", "cond_dim", "n_blocks", "n_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MDLMConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_dim % self.n_heads or (self.hidden_dim // self.n_heads) % 2:
            raise ValueError(
                f"MDLMConfig: hidden_dim ({self.hidden_dim}) must split into n_heads ({self.n_heads}) "
                "heads of even size (rotary embeddings)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MDLMConfig.dropout must lie in [0, 1), got {self.dropout!r}")
        if self.mask_token_id is None:
            self.mask_token_id = self.vocab_size - 1
        if self.vocab_size == GPT2_VOCAB_WITH_MASK:
            for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
                if getattr(self, name) is None:
                    setattr(self, name, GPT2_EOS)
        for name in ("mask_token_id", "eos_token_id", "bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size
            ):
                raise ValueError(f"MDLMConfig.{name} must be a token id in [0, {self.vocab_size}), got {value!r}")

    # Names the shared code reads on every family's config.
    @property
    def hidden_size(self) -> int:
        return self.hidden_dim

    @property
    def num_hidden_layers(self) -> int:
        return self.n_blocks

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def max_position_embeddings(self) -> int:
        return self.model_length

    tie_word_embeddings = False

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MDLMConfig:
        """From an MDLM ``config.json`` dict; keys of the Hugging Face wrapper (``auto_map``, ...) are ignored."""
        if not isinstance(raw, dict):
            raise TypeError(f"an MDLM config must be a dict, got {type(raw).__name__}")
        if str(raw.get("model_type", "mdlm")).lower() != "mdlm":
            raise ValueError(f"model_type {raw.get('model_type')!r} is not an MDLM config (expected 'mdlm')")
        problems = [
            f"{key}={raw[key]!r} (only {want!r} is supported)"
            for key, want in (("parameterization", "subs"), ("backbone", "dit"))
            if key in raw and raw[key] != want
        ]
        if problems:
            raise ValueError("unsupported MDLM config: " + ", ".join(problems))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "mdlm", "architectures": ["MDLM"], **dataclasses.asdict(self)}


class LayerNorm(nn.Module):
    """LayerNorm without bias, computed in fp32 (as MDLM's DiT does), cast back before the weight."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * F.layer_norm(x.float(), x.shape[-1:]).to(x.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with per-sequence ``shift, scale`` [B, 1, D]."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the noise level (max period 10000, cos then sin) through a two-layer SiLU MLP."""

    def __init__(self, cond_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQUENCIES, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: Tensor) -> Tensor:
        half = TIMESTEP_FREQUENCIES // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class EmbeddingLayer(nn.Module):
    """The token embedding table, stored as MDLM stores it (``embedding`` [V, D]); ``weight`` is the same tensor."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))

    @property
    def weight(self) -> Tensor:
        return self.embedding

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.embedding)


class DiTBlock(nn.Module):
    """One DiT block: adaLN-modulated bidirectional attention and MLP, each with a gated residual."""

    def __init__(self, config: MDLMConfig) -> None:
        super().__init__()
        dim = config.hidden_dim
        self.n_heads, self.dropout = config.n_heads, config.dropout
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.adaLN_modulation = nn.Linear(config.cond_dim, 6 * dim)

    def forward(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None) -> Tensor:
        """x [B, T, D], c [B, cond_dim], cos/sin [B, T, 1, head_dim/2] -> [B, T, D]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        q, k, v = self.attn_qkv(modulate(self.norm1(x), shift1, scale1)).chunk(3, dim=-1)  # (three, heads, dim)
        attn = self.attn_out(self_attention(q, k, v, cos, sin, attn_mask, self.n_heads, self.n_heads))
        x = x + gate1 * F.dropout(attn, self.dropout, self.training)
        mlp = self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x + gate2 * F.dropout(mlp, self.dropout, self.training)


class FinalLayer(nn.Module):
    """adaLN-modulated norm and the biased output projection."""

    def __init__(self, config: MDLMConfig) -> None:
        super().__init__()
        self.norm_final = LayerNorm(config.hidden_dim)
        self.linear = nn.Linear(config.hidden_dim, config.vocab_size)
        self.adaLN_modulation = nn.Linear(config.cond_dim, 2 * config.hidden_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return modulate(self.norm_final(x), shift, scale)


class DiTBackbone(nn.Module):
    """Everything under the checkpoint's ``backbone.`` prefix."""

    def __init__(self, config: MDLMConfig) -> None:
        super().__init__()
        self.vocab_embed = EmbeddingLayer(config.vocab_size, config.hidden_dim)
        self.sigma_map = TimestepEmbedder(config.cond_dim)
        self.rotary_emb = RotaryEmbedding(config.hidden_dim // config.n_heads, ROTARY_THETA, config.model_length)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.n_blocks))
        self.output_layer = FinalLayer(config)


class MDLMModel(DiffusionGenerateMixin, nn.Module):
    """A DiT masked diffusion LM (MDLM), SUBS-parameterised.

    Build with ``MDLMModel(config)`` (random weights as MDLM initialises them: adaLN and the output projection start
    at zero) or load with ``MDLMModel.from_pretrained(path)``.
    """

    def __init__(self, config: MDLMConfig) -> None:
        super().__init__()
        if not isinstance(config, MDLMConfig):
            raise TypeError(f"config must be an MDLMConfig, got {type(config).__name__}")
        self.config = config
        self.name_or_path: str | None = None
        self.backbone = DiTBackbone(config)
        if self.backbone.vocab_embed.embedding.device.type != "meta":
            self.reset_parameters()

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.vocab_embed.embedding.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.vocab_embed.embedding.device

    def get_input_embeddings(self) -> EmbeddingLayer:
        return self.backbone.vocab_embed

    def reset_parameters(self) -> None:
        """MDLM's initialisation: Kaiming-uniform embeddings, PyTorch's default linears, zero adaLN and output."""
        backbone = self.backbone
        nn.init.kaiming_uniform_(backbone.vocab_embed.embedding, a=math.sqrt(5))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
            elif isinstance(module, LayerNorm):
                nn.init.ones_(module.weight)
        for linear in [block.adaLN_modulation for block in backbone.blocks] + [
            backbone.output_layer.adaLN_modulation,
            backbone.output_layer.linear,
        ]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        logits_rows: Tensor | None = None,
        sigma: Tensor | None = None,
    ) -> LMOutput:
        """Logits with the mask class at ``-1e6`` (SUBS' first part; the carry-over is :func:`subs_log_probs`).

        Args:
            input_ids: int64 [B, T]; or inputs_embeds: [B, T, hidden_dim] (exactly one).
            attention_mask: [B, T], 1 for tokens and 0 for padding (padded keys are masked out; default positions
                become ``cumsum(mask) - 1``), or a 4-D mask broadcastable to [B, heads, T, T].
            position_ids: int64 [B, T] or [T]; default 0..T-1 (MDLM's positions), below ``model_length``.
            logits_rows: int64 [B, R] or flat [N] rows to project (see :meth:`DiffusionTransformer.forward`); None: all.
            sigma: fp32 [B] noise levels ``-log(alpha_t)``; read only when ``config.time_conditioning`` (otherwise
                the conditioning is zero, as in MDLM).

        Returns:
            :class:`LMOutput` with ``.logits`` in the model's dtype, [B, T, V] / [B, R, V] / [N, V].
        """
        h = self._input_embeddings(input_ids, inputs_embeds)
        B, T, _ = h.shape
        if self.config.model_length < T:
            raise ValueError(f"sequence length {T} exceeds the model's length {self.config.model_length}")
        attn_mask, position_ids = attention_and_positions(attention_mask, position_ids, B, T, h)
        if self.config.time_conditioning:
            if sigma is None:
                raise ValueError("this MDLM is time-conditioned: pass sigma= (fp32 [B] noise levels)")
            sigma = sigma.reshape(-1).expand(B)
        else:
            sigma = torch.zeros(B, device=h.device)
        backbone = self.backbone
        c = F.silu(backbone.sigma_map(sigma)).to(h.dtype)
        cos, sin = backbone.rotary_emb(position_ids, h.dtype)
        for block in backbone.blocks:
            h = block(h, c, cos, sin, attn_mask)
        # The mask offset goes onto the 2-D GEMM output, not onto a view of it: FSDP hooks the returned logits for
        # backward, and that hook crashes (torch 2.13: a segmentation fault) on a view updated in place.
        h = select_rows(backbone.output_layer(h, c), logits_rows)
        logits = backbone.output_layer.linear(h.reshape(-1, h.shape[-1]))
        logits[:, self.config.mask_token_id] += NEG_INFINITY
        logits = logits.view(*h.shape[:-1], -1)
        return LMOutput(logits)

    def _input_embeddings(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
        return embed_inputs(self.backbone.vocab_embed, self.config.hidden_dim, self.dtype, input_ids, inputs_embeds)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> MDLMModel:
        """Load an MDLM checkpoint directory (``config.json`` + ``model.safetensors``); see :func:`load_mdlm`."""
        return load_mdlm(path, dtype=dtype, device=device, **kwargs)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` in the public checkpoints' layout."""
        save_mdlm(self, path)


def subs_log_probs(logits: Tensor, x_t: Tensor, mask_token_id: int) -> Tensor:
    """SUBS log-probabilities [..., V] in fp32 from the model's logits [..., V] and the current tokens [...].

    Masked positions get ``log_softmax(logits)`` (the mask class already holds ``-1e6``, so it gets no mass);
    every other position is carried over: 0 at its current token and ``-1e6`` elsewhere.
    """
    if logits.shape[:-1] != x_t.shape:
        raise ValueError(f"subs_log_probs: logits {tuple(logits.shape)} do not match tokens {tuple(x_t.shape)}")
    logits = logits.float()
    log_p = logits - torch.logsumexp(logits, dim=-1, keepdim=True)  # MDLM's normalisation (not log_softmax's rounding)
    carried = torch.full_like(log_p, NEG_INFINITY).scatter_(-1, x_t.unsqueeze(-1), 0.0)
    return torch.where((x_t == mask_token_id).unsqueeze(-1), log_p, carried)


def check_tokenizer(config: MDLMConfig, tokenizer_size: int) -> list[str]:
    """Problems between a checkpoint's vocabulary and a tokenizer of ``tokenizer_size`` ids (empty if none).

    MDLM either appends the mask to the tokenizer (``vocab_size == size + 1``, mask = last id) or uses a tokenizer
    that holds it (``vocab_size == size``)."""
    if tokenizer_size == config.vocab_size or (
        tokenizer_size + 1 == config.vocab_size and config.mask_token_id == config.vocab_size - 1
    ):
        return []
    return [
        (
            f"the tokenizer has {tokenizer_size} ids but the model's vocab_size is {config.vocab_size} "
            f"(expected {config.vocab_size} or {config.vocab_size - 1} with the mask appended)"
        )
    ]


def load_mdlm(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    tokenizer_size: int | None = None,
) -> MDLMModel:
    """Load an MDLM checkpoint directory into an :class:`MDLMModel` in eval mode (safetensors only).

    Every tensor's name and shape is checked against ``config.json`` from the file header before anything is read,
    and so is the size of the tokenizer (``tokenizer_size``, or the ``tokenizer.json`` in the directory); all
    problems are reported in one ValueError. ``dtype`` None keeps the stored dtype.
    """
    from .loading import IGNORED_TENSOR, _weight_map

    path = os.fspath(path)
    if dtype is not None and dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {_SUPPORTED_DTYPES}, got {dtype!r}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    config = MDLMConfig.from_pretrained(path)
    weight_map = _weight_map(path)
    with torch.device("meta"):
        model = MDLMModel(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    shapes, dtypes = {}, {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(os.path.join(path, shard), framework="pt") as f:
            for name in f.keys():
                info = f.get_slice(name)
                shapes[name], dtypes[name] = tuple(info.get_shape()), info.get_dtype()
    problems = []
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(n for n in shapes if n not in expected and not IGNORED_TENSOR.match(n))
    misshaped = [
        f"{n}: file {list(shapes[n])} vs config {list(expected[n])}"
        for n in sorted(set(expected) & set(shapes))
        if shapes[n] != expected[n]
    ]
    bad_dtype = [
        f"{n}: {dtypes[n]}" for n in sorted(set(expected) & set(dtypes)) if dtypes[n] not in ("F32", "BF16", "F16")
    ]
    for title, items in (
        ("missing tensors", missing),
        ("unexpected tensors", unexpected),
        ("tensors whose shape does not match config.json", misshaped),
        ("tensors of an unsupported dtype (need F32/BF16/F16)", bad_dtype),
    ):
        if items:
            problems.append(
                f"{title}: " + ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
            )
    if tokenizer_size is None and os.path.isfile(os.path.join(path, "tokenizer.json")):
        from tokenizers import Tokenizer

        tokenizer_size = Tokenizer.from_file(os.path.join(path, "tokenizer.json")).get_vocab_size()
    if tokenizer_size is not None:
        problems += check_tokenizer(config, tokenizer_size)
    if problems:
        raise ValueError(f"MDLM checkpoint {path!r} does not match its config.json:\n  " + "\n  ".join(problems))
    device = torch.device(device if device is not None else "cpu")
    state = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(os.path.join(path, shard), framework="pt", device=str(device)) as f:
            for name in f.keys():
                if name in expected:
                    tensor = f.get_tensor(name)
                    state[name] = tensor.to(dtype) if dtype is not None else tensor
    model.load_state_dict(state, strict=True, assign=True)
    model.name_or_path = os.path.abspath(path)
    return model.eval()


def save_mdlm(model: MDLMModel, path: str | os.PathLike) -> None:
    """``config.json`` + ``model.safetensors`` with the public checkpoints' tensor names."""
    if not isinstance(model, MDLMModel):
        raise TypeError(f"save_mdlm needs an MDLMModel, got {type(model).__name__}")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    state = {n: t.detach().to("cpu").contiguous() for n, t in model.state_dict().items()}
    save_file(state, os.path.join(path, MODEL_WEIGHTS), metadata={"format": "pt"})
    model.config.save_pretrained(path)


MDLMModel.family = register_family(
    ModelFamily(
        name="mdlm",
        model_types=("mdlm",),
        logit_shift=0,
        load=load_mdlm,
        decoder_layer=DiTBlock,
        default_decoding={"sampler": "mdlm", "eps": 1e-5},
    )
)
