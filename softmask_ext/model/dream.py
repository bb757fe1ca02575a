"""The Dream model: Qwen2 with bidirectional attention, in a few hundred readable lines.

Module and parameter names follow the Qwen2 checkpoint layout (`model.layers.N.self_attn.q_proj.weight`, ...), so a
checkpoint's state dict loads as is and PEFT adapters are named as for the reference implementation.

The forward pass is written for capture in CUDA graphs and for `torch.compile(fullgraph=True)`: no host
synchronisation, no data-dependent shapes, and Python branches only on shapes, dtypes and arguments given or not.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import DreamConfig
from .family import ModelFamily, register_family

try:  # optional: used for unmasked fp16/bf16 attention on CUDA, SDPA otherwise
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


class DreamOutput(NamedTuple):
    """Model output; `out.logits`, `out[0]` and `logits, = out` all work."""

    logits: torch.Tensor


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back before the weight (as Qwen2 does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of the rotary embedding, built once per (device, dtype) and looked up by position id.

    Tables cover `max_positions` positions and hold head_dim/2 columns (the two halves of a head share angles).
    They are built in fp32 and cast, which gives the same values as computing them per call. The first forward on a
    new device/dtype builds the table, so run one eager forward before capturing a CUDA graph.
    """

    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.max_positions = max_positions
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _build(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponents)
        angles = torch.arange(self.max_positions, device=device).float()[:, None] * inv_freq
        table = (angles.cos().to(dtype), angles.sin().to(dtype))
        self._tables[(device, dtype)] = table
        return table

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids int64 [B, T] -> (cos, sin), each [B, T, 1, head_dim/2] in `dtype`."""
        table = self._tables.get((position_ids.device, dtype))
        if table is None:
            table = self._build(position_ids.device, dtype)
        cos, sin = table
        return F.embedding(position_ids, cos)[:, :, None], F.embedding(position_ids, sin)[:, :, None]

    def _apply(self, fn, recurse=True):
        self._tables.clear()  # tables are rebuilt lazily on the new device/dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, max_positions={self.max_positions}"


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, T, H, D] by (cos, sin) [B, T, 1, D/2], pairing dimension i with i + D/2 (Qwen2's convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    """Bidirectional grouped-query self-attention."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, q_dim, kv_dim = config.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rotary(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if _can_use_flash_attn(q, attn_mask):
            out = flash_attn_func(q, k, v, causal=False)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if attn_mask is None:
                out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.n_kv_heads != self.n_heads)
            else:
                # Fused SDPA kernels that take a mask do not all take grouped K/V heads, so expand them here.
                groups = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            out = out.transpose(1, 2)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.head_dim))


def _can_use_flash_attn(q: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    return (flash_attn_func is not None and attn_mask is None and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256)


class MLP(nn.Module):
    """SwiGLU feed-forward block."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamBackbone(nn.Module):
    """Embeddings, decoder layers and the final norm: the `model.` prefix of the checkpoint."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        # padding_idx as in Qwen2/Dream: the pad row gets no gradient from the lookup
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_position_embeddings)
        self.gradient_checkpointing = False
        self.checkpoint_kwargs: dict[str, Any] = {}

    def forward(self, h: torch.Tensor, position_ids: torch.Tensor,
                attn_mask: torch.Tensor | None) -> torch.Tensor:
        cos, sin = self.rotary_emb(position_ids, h.dtype)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpointing:
                h = checkpoint(layer, h, cos, sin, attn_mask, **self.checkpoint_kwargs)
            else:
                h = layer(h, cos, sin, attn_mask)
        return self.norm(h)


class DreamModel(nn.Module):
    """Dream masked-diffusion language model (Qwen2 architecture, bidirectional attention).

    Build with `DreamModel(config)` (random weights; under `torch.device("meta")` for no allocation) or load with
    `DreamModel.from_pretrained(path, dtype=None, device=None)`.
    """

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        if not isinstance(config, DreamConfig):
            raise TypeError(f"config must be a DreamConfig, got {type(config).__name__}")
        self.config = config
        self.name_or_path: str | None = None  # absolute, set by from_pretrained; PEFT records it in adapter configs
        self.model = DreamBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if self.lm_head.weight.device.type != "meta":
            self.reset_parameters()

    # ------------------------------------------------------------------ HF-style accessors
    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def reset_parameters(self, std: float = 0.02) -> None:
        """Random init as Qwen2/Dream pretraining does: N(0, std) weights, zero biases and pad row, unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        if self.model.embed_tokens.padding_idx is not None:
            with torch.no_grad():
                self.model.embed_tokens.weight[self.model.embed_tokens.padding_idx].zero_()

    # ------------------------------------------------------------------ gradient checkpointing (HF names)
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recompute each decoder layer in backward. Default `use_reentrant=False`; pass
        `{"use_reentrant": True}` to get the reentrant variant (then inputs must require grad, see
        `enable_input_require_grads`)."""
        self.model.checkpoint_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    def enable_input_require_grads(self) -> None:
        """Make the embedding output require grad, so reentrant checkpointing works with frozen embeddings.
        (Inputs passed as `inputs_embeds` bypass the embedding and must carry their own grad requirement.)"""
        def hook(module, inputs, output):
            output.requires_grad_(True)
        if getattr(self, "_input_require_grads_hook", None) is None:
            self._input_require_grads_hook = self.get_input_embeddings().register_forward_hook(hook)

    def disable_input_require_grads(self) -> None:
        handle = getattr(self, "_input_require_grads_hook", None)
        if handle is not None:
            handle.remove()
            del self._input_require_grads_hook

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_rows: torch.Tensor | None = None,
    ) -> DreamOutput:
        """Logits of a bidirectional pass.

        Args:
            input_ids: int64 [B, T] token ids; or
            inputs_embeds: [B, T, hidden_size] input embeddings (exactly one of the two).
            attention_mask: [B, T] with 1 (or True) for real tokens and 0 for padding: padded keys are masked out and,
                when `position_ids` is not given, positions are cumsum(mask) - 1 clamped at 0 (Dream's left padding).
                Or a 4-D mask broadcastable to [B, heads, T, T]: bool (True = may attend) or additive float.
            position_ids: int64 [B, T] or [T]; default as above, else 0..T-1. Must be < max_position_embeddings
                (not checked on the device, which would need a host sync).
            logits_rows: which hidden rows go through the LM head (the rest are never projected):
                int64 [B, R]: per-sequence row indices into T -> logits [B, R, V];
                int64 [N]: flat indices into the B*T rows (row b*T + t) -> logits [N, V].
                None: all rows -> logits [B, T, V]. Indices are not range-checked on the device.

        Returns:
            DreamOutput with `.logits` in the model's dtype.
        """
        h = self._input_embeddings(input_ids, inputs_embeds)
        B, T, _ = h.shape
        attn_mask, default_positions = self._prepare_mask(attention_mask, B, T, h.dtype)
        if position_ids is None:
            position_ids = default_positions if default_positions is not None else (
                torch.arange(T, device=h.device).expand(B, T))
        else:
            position_ids = _check_position_ids(position_ids, B, T)
        h = self.model(h, position_ids, attn_mask)
        return DreamOutput(self.lm_head(_select_rows(h, logits_rows)))

    def _input_embeddings(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
                raise ValueError(f"input_ids must be a 2-D [batch, seq] tensor, got {_describe(input_ids)}")
            if input_ids.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
            return self.model.embed_tokens(input_ids)
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 \
                or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must be [batch, seq, {self.config.hidden_size}], "
                             f"got {_describe(inputs_embeds)}")
        if inputs_embeds.dtype != self.dtype:
            raise TypeError(f"inputs_embeds has dtype {inputs_embeds.dtype} but the model is {self.dtype}")
        return inputs_embeds

    @staticmethod
    def _prepare_mask(attention_mask: torch.Tensor | None, B: int, T: int,
                      dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """-> (SDPA mask or None, default position ids or None)."""
        if attention_mask is None:
            return None, None
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
        if attention_mask.dim() == 2:
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask must be [{B}, {T}], got {list(attention_mask.shape)}")
            keep = attention_mask != 0
            positions = (keep.long().cumsum(-1) - 1).clamp(min=0)
            return keep[:, None, None, :], positions
        if attention_mask.dim() == 4:
            try:
                torch.broadcast_shapes(attention_mask.shape[:1] + attention_mask.shape[2:], (B, T, T))
            except RuntimeError:
                raise ValueError(f"a 4-D attention_mask must broadcast to [{B}, heads, {T}, {T}], "
                                 f"got {list(attention_mask.shape)}") from None
            return (attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(dtype)), None
        raise ValueError(f"attention_mask must be [batch, seq] or 4-D, got {list(attention_mask.shape)}")

    # ------------------------------------------------------------------ loading, saving, decoding
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None,
                        base_model: str | os.PathLike | None = None) -> "DreamModel":
        """Load a Dream/Qwen2 checkpoint directory (safetensors only), or a folder of LoRA/DoRA adapters merged into
        their base model; see `softmask_ext.model.loading`."""
        from .loading import load_pretrained
        return load_pretrained(path, dtype=dtype, device=device, base_model=base_model)

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        """Write config.json and safetensors (sharded with an index when larger than `max_shard_size`)."""
        from .loading import save_pretrained
        save_pretrained(self, path, max_shard_size=max_shard_size)

    def diffusion_generate(self, *args, **kwargs):
        """Masked-diffusion decoding; see `softmask_ext.decoding.diffusion_generate`."""
        from softmask_ext.decoding import diffusion_generate
        return diffusion_generate(self, *args, **kwargs)


def _load_dream(path: str | os.PathLike, dtype: torch.dtype | None = None,
                device: str | torch.device | None = None, **kwargs: Any) -> "DreamModel":
    return DreamModel.from_pretrained(path, dtype=dtype, device=device, **kwargs)


DreamModel.family = register_family(ModelFamily(
    name="dream",
    model_types=("Dream", "qwen2"),
    logit_shift=1,
    load=_load_dream,
    decoder_layer=DecoderLayer,
    default_decoding={"alg": "entropy", "eps": 1e-3},
))


def _check_position_ids(position_ids: torch.Tensor, B: int, T: int) -> torch.Tensor:
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"position_ids must be an integer tensor, got {_describe(position_ids)}")
    if position_ids.shape not in ((T,), (1, T), (B, T)):
        raise ValueError(f"position_ids must be [{T}], [1, {T}] or [{B}, {T}], got {list(position_ids.shape)}")
    return position_ids.expand(B, T)


def _select_rows(h: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Hidden rows for the LM head: all of h [B, T, D], or those named by `rows` (see DreamModel.forward)."""
    if rows is None:
        return h
    if not isinstance(rows, torch.Tensor) or rows.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"logits_rows must be an integer tensor, got {_describe(rows)}")
    B, T, D = h.shape
    if rows.dim() == 1:
        return h.reshape(B * T, D).index_select(0, rows)
    if rows.dim() == 2 and rows.shape[0] == B:
        return h.gather(1, rows.long()[:, :, None].expand(B, rows.shape[1], D))
    raise ValueError(f"logits_rows must be [{B}, R] or flat [N], got {list(rows.shape)}")


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__
