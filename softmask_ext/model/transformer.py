"""Transformer building blocks shared by the model families (Dream, LLaDA): one implementation, many layouts.

Dream (Qwen2) and LLaDA (LLaMA-style) are the same computation with different parameters and different tensor
names: pre-norm blocks of RMSNorm -> grouped-query self-attention with rotary embeddings -> RMSNorm -> SwiGLU MLP,
a final RMSNorm and a linear head, all bidirectional. This module owns that computation:

- :class:`RMSNorm`, :class:`RotaryEmbedding`, :func:`apply_rotary`, :func:`self_attention` (SDPA or FlashAttention,
  GQA, masks), :func:`swiglu`;
- :class:`Attention`, :class:`MLP`, :class:`DecoderLayer`: the Qwen2/Llama module layout (Dream's names);
- :class:`DecoderStack`: rotary tables + decoder layers + final norm, with per-layer gradient checkpointing;
- :class:`DiffusionTransformer`: the language-model shell every family shares (argument checks, attention masks and
  default positions, ``logits_rows``, gradient checkpointing, input-grad hooks, random init).

A family supplies only its layout (module names, as its checkpoints spell them) and its config. The parameters a
block needs are read from the config by these names: ``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
``num_key_value_heads``, ``head_dim``, ``qkv_bias``, ``rms_norm_eps``, ``rope_theta``, ``max_position_embeddings``.

Everything here is written for capture in CUDA graphs and for ``torch.compile(fullgraph=True)``: no host
synchronisation, no data-dependent shapes, Python branches only on shapes, dtypes and arguments given or not.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .kv_cache import CacheView, LayerCache

try:  # optional: used for unmasked fp16/bf16 attention on CUDA, SDPA otherwise
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)
TOKEN_ID_FIELDS = ("mask_token_id", "pad_token_id", "eos_token_id", "bos_token_id")


class LMOutput(NamedTuple):
    """Model output; `out.logits`, `out[0]` and `logits, = out` all work."""

    logits: torch.Tensor


def validate_transformer_config(config: Any) -> None:
    """Check the fields the shared blocks read (and the token ids); ValueError naming the first bad one."""
    owner = type(config).__name__
    for name in SHAPE_FIELDS:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads ({config.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({config.num_key_value_heads}) for grouped-query attention"
        )
    if config.head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {config.head_dim}")
    if not config.rms_norm_eps > 0:
        raise ValueError(f"rms_norm_eps must be > 0, got {config.rms_norm_eps!r}")
    if not config.rope_theta > 0:
        raise ValueError(f"rope_theta must be > 0, got {config.rope_theta!r}")
    for name in TOKEN_ID_FIELDS:
        value = getattr(config, name)
        if value is None and name != "mask_token_id":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < config.vocab_size:
            raise ValueError(f"{owner}.{name} must be a token id in [0, {config.vocab_size}), got {value!r}")


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back before the weight (as Qwen2 and LLaDA do)."""

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
        inv_freq = 1.0 / (self.theta**exponents)
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
    """Rotate [B, T, H, D] by (cos, sin) [B, T, 1, D/2], pairing dimension i with i + D/2 (Qwen2's and LLaDA's
    convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attn_mask: torch.Tensor | None,
    n_heads: int,
    n_kv_heads: int,
    kv_cache: LayerCache | None = None,
) -> torch.Tensor:
    """Bidirectional grouped-query attention of projected inputs.

    Args:
        q: [B, T, n_heads * D]; k, v: [B, T, n_kv_heads * D] (the outputs of the q/k/v projections).
        cos, sin: rotary tables [B, T, 1, D/2] from :class:`RotaryEmbedding`.
        attn_mask: None, or a mask broadcastable to [B, heads, T, T] (bool: True = may attend; or additive float);
            with a cache, to [B, heads, T, T_cache].
        kv_cache: this layer's static K/V cache (:mod:`.kv_cache`): the rotated K and V of the T positions run are
            written into their columns, and the queries attend to all T_cache cached positions.

    Returns:
        [B, T, n_heads * D], ready for the output projection.
    """
    B, T, _ = q.shape
    head_dim = q.shape[-1] // n_heads
    q = apply_rotary(q.view(B, T, n_heads, head_dim), cos, sin)
    k = apply_rotary(k.view(B, T, n_kv_heads, head_dim), cos, sin)
    v = v.view(B, T, n_kv_heads, head_dim)
    if kv_cache is not None:
        k, v = kv_cache.update(k, v)
    if _can_use_flash_attn(q, attn_mask):
        out = flash_attn_func(q, k, v, causal=False)
    else:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=n_kv_heads != n_heads)
        else:
            # Fused SDPA kernels that take a mask do not all take grouped K/V heads, so expand them here.
            groups = n_heads // n_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2)
    return out.reshape(B, T, n_heads * head_dim)


def _can_use_flash_attn(q: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    return (
        flash_attn_func is not None
        and attn_mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= 256
    )


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's hidden activation: silu(gate) * up (the input of the down projection)."""
    return F.silu(gate) * up


def qkv_projections(config: Any) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """The q, k, v projections of one attention block (biases when ``config.qkv_bias``)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return (
        nn.Linear(hidden, q_dim, bias=config.qkv_bias),
        nn.Linear(hidden, kv_dim, bias=config.qkv_bias),
        nn.Linear(hidden, kv_dim, bias=config.qkv_bias),
    )


class Attention(nn.Module):
    """Bidirectional grouped-query self-attention, Qwen2/Llama layout (`q_proj`, `k_proj`, `v_proj`, `o_proj`)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj, self.k_proj, self.v_proj = qkv_projections(config)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        kv_cache: LayerCache | None = None,
    ) -> torch.Tensor:
        out = self_attention(
            self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, attn_mask, self.n_heads, self.n_kv_heads, kv_cache
        )
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU feed-forward block, Qwen2/Llama layout (`gate_proj`, `up_proj`, `down_proj`)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block, Qwen2/Llama layout: `input_layernorm`, `self_attn`, `post_attention_layernorm`, `mlp`."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        kv_cache: LayerCache | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module, ABC):
    """Rotary tables, decoder layers and the final norm; a family's subclass names the layers and the norm as its
    checkpoints do and returns them from :meth:`layers_and_norm`."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_position_embeddings)
        self.gradient_checkpointing = False
        self.checkpoint_kwargs: dict[str, Any] = {}

    @abstractmethod
    def layers_and_norm(self) -> tuple[nn.ModuleList, nn.Module]:
        """(the decoder layers in order, the final norm)."""

    def forward(
        self,
        h: torch.Tensor,
        position_ids: torch.Tensor,
        attn_mask: torch.Tensor | None,
        kv_cache: CacheView | None = None,
    ) -> torch.Tensor:
        """[B, T, D] input embeddings -> [B, T, D] final hidden states (after the final norm); a layer's
        ``forward(h, cos, sin, attn_mask[, kv_cache])`` gets its cache when ``kv_cache`` is given."""
        layers, norm = self.layers_and_norm()
        cos, sin = self.rotary_emb(position_ids, h.dtype)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for index, layer in enumerate(layers):
            if checkpointing:
                h = checkpoint(layer, h, cos, sin, attn_mask, **self.checkpoint_kwargs)
            elif kv_cache is not None:
                h = layer(h, cos, sin, attn_mask, kv_cache.layer(index))
            else:
                h = layer(h, cos, sin, attn_mask)
        return norm(h)


class DiffusionGenerateMixin:
    """``model.diffusion_generate(...)``, the convenience every family's model class offers: the model layer's one
    reach into decoding, imported inside the method so that importing a model never imports the decoding package."""

    def diffusion_generate(self, *args: Any, **kwargs: Any) -> Any:
        """Masked-diffusion decoding with this model; see :func:`softmask_ext.decoding.diffusion_generate`."""
        from softmask_ext.decoding import diffusion_generate

        return diffusion_generate(self, *args, **kwargs)


class DiffusionTransformer(DiffusionGenerateMixin, nn.Module, ABC):
    """The language-model shell shared by the families: a :class:`DecoderStack` between an embedding table and a
    linear head. A subclass builds its modules under its checkpoints' names and returns the three parts from
    :meth:`decoder_stack`, :meth:`get_input_embeddings` and :meth:`get_output_embeddings`."""

    config: Any

    @abstractmethod
    def decoder_stack(self) -> DecoderStack:
        """The module that runs the decoder layers and the final norm."""

    @abstractmethod
    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding table [vocab_size, hidden_size]."""

    @abstractmethod
    def get_output_embeddings(self) -> nn.Linear:
        """The LM head hidden_size -> vocab_size."""

    # ------------------------------------------------------------------ HF-style accessors
    @property
    def dtype(self) -> torch.dtype:
        return self.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.get_input_embeddings().weight.device

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.get_input_embeddings()

    def weight_name(self, module: nn.Module) -> str:
        """State-dict name of a submodule's weight, e.g. of the embedding table or of the LM head."""
        return next(f"{name}.weight" for name, m in self.named_modules() if m is module)

    def tie_weights(self) -> None:
        """Share the embedding table with the LM head when the config ties them (no-op otherwise)."""
        if self.config.tie_word_embeddings:
            self.get_output_embeddings().weight = self.get_input_embeddings().weight

    def reset_parameters(self, std: float = 0.02) -> None:
        """Random init as Qwen2/Dream/LLaDA pretraining does: N(0, std) weights, zero biases and pad row, unit
        norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        embed = self.get_input_embeddings()
        if embed.padding_idx is not None:
            with torch.no_grad():
                embed.weight[embed.padding_idx].zero_()

    # ------------------------------------------------------------------ gradient checkpointing (HF names)
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recompute each decoder layer in backward. Default `use_reentrant=False`; pass
        `{"use_reentrant": True}` to get the reentrant variant (then inputs must require grad, see
        `enable_input_require_grads`)."""
        stack = self.decoder_stack()
        stack.checkpoint_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        stack.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.decoder_stack().gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.decoder_stack().gradient_checkpointing

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
        kv_cache: CacheView | None = None,
    ) -> LMOutput:
        """Logits of a bidirectional pass.

        Args:
            input_ids: int64 [B, T] token ids; or
            inputs_embeds: [B, T, hidden_size] input embeddings (exactly one of the two).
            attention_mask: [B, T] with 1 (or True) for real tokens and 0 for padding: padded keys are masked out and,
                when `position_ids` is not given, positions are cumsum(mask) - 1 clamped at 0 (left padding; rotary
                attention depends only on position differences, so real tokens see the same scores as unpadded).
                Or a 4-D mask broadcastable to [B, heads, T, T]: bool (True = may attend) or additive float.
            position_ids: int64 [B, T] or [T]; default as above, else 0..T-1. Must be < max_position_embeddings
                (not checked on the device, which would need a host sync).
            logits_rows: which hidden rows go through the LM head (the rest are never projected):
                int64 [B, R]: per-sequence row indices into T -> logits [B, R, V];
                int64 [N]: flat indices into the B*T rows (row b*T + t) -> logits [N, V].
                None: all rows -> logits [B, T, V]. Indices are not range-checked on the device.
            kv_cache: a static K/V cache as one forward sees it (``KVCache.at(columns)``, :mod:`.kv_cache`): the
                T positions run are the cache's ``columns``; they write their K/V there and attend to every cached
                position. Then `position_ids` are required and a 2-D `attention_mask` covers the cache's positions.

        Returns:
            LMOutput with `.logits` in the model's dtype.
        """
        h = self._input_embeddings(input_ids, inputs_embeds)
        B, T, _ = h.shape
        if kv_cache is not None:
            if position_ids is None or (attention_mask is not None and attention_mask.dim() != 2):
                raise ValueError("a forward with kv_cache needs position_ids and a 2-D attention_mask (or none)")
            attn_mask, _ = prepare_attention_mask(attention_mask, B, kv_cache.length, h.dtype)
            h = self.decoder_stack()(h, _check_position_ids(position_ids, B, T), attn_mask, kv_cache)
            return LMOutput(self.get_output_embeddings()(select_rows(h, logits_rows)))
        attn_mask, position_ids = attention_and_positions(attention_mask, position_ids, B, T, h)
        h = self.decoder_stack()(h, position_ids, attn_mask)
        return LMOutput(self.get_output_embeddings()(select_rows(h, logits_rows)))

    def _input_embeddings(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        return embed_inputs(self.get_input_embeddings(), self.config.hidden_size, self.dtype, input_ids, inputs_embeds)


def attention_and_positions(
    attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, B: int, T: int, h: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A forward's (SDPA mask or None, position ids [B, T]): the given positions (checked), else those the attention
    mask implies for left padding, else ``0 .. T-1``; ``h`` [B, T, D] gives the mask's dtype and the device."""
    attn_mask, default_positions = prepare_attention_mask(attention_mask, B, T, h.dtype)
    if position_ids is not None:
        return attn_mask, _check_position_ids(position_ids, B, T)
    if default_positions is not None:
        return attn_mask, default_positions
    return attn_mask, torch.arange(T, device=h.device).expand(B, T)


def prepare_attention_mask(
    attention_mask: torch.Tensor | None, B: int, T: int, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A forward's `attention_mask` -> (SDPA mask or None, default position ids or None)."""
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
            raise ValueError(
                f"a 4-D attention_mask must broadcast to [{B}, heads, {T}, {T}], got {list(attention_mask.shape)}"
            ) from None
        return (attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(dtype)), None
    raise ValueError(f"attention_mask must be [batch, seq] or 4-D, got {list(attention_mask.shape)}")


def _check_position_ids(position_ids: torch.Tensor, B: int, T: int) -> torch.Tensor:
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"position_ids must be an integer tensor, got {describe(position_ids)}")
    if position_ids.shape not in ((T,), (1, T), (B, T)):
        raise ValueError(f"position_ids must be [{T}], [1, {T}] or [{B}, {T}], got {list(position_ids.shape)}")
    return position_ids.expand(B, T)


def select_rows(h: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Hidden rows for the LM head: all of h [B, T, D], or those named by `rows` (see DiffusionTransformer.forward)."""
    if rows is None:
        return h
    if not isinstance(rows, torch.Tensor) or rows.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"logits_rows must be an integer tensor, got {describe(rows)}")
    B, T, D = h.shape
    if rows.dim() == 1:
        return h.reshape(B * T, D).index_select(0, rows)
    if rows.dim() == 2 and rows.shape[0] == B:
        return h.gather(1, rows.long()[:, :, None].expand(B, rows.shape[1], D))
    raise ValueError(f"logits_rows must be [{B}, R] or flat [N], got {list(rows.shape)}")


def describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__


def embed_inputs(
    embedding: nn.Module,
    hidden: int,
    dtype: torch.dtype,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
) -> torch.Tensor:
    """The input embeddings [B, T, hidden] of a forward given exactly one of ``input_ids`` (int [B, T], looked up in
    ``embedding``) or ``inputs_embeds`` (checked against the model's width and ``dtype``)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D [batch, seq] tensor, got {describe(input_ids)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        return embedding(input_ids)
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden:
        raise ValueError(f"inputs_embeds must be [batch, seq, {hidden}], got {describe(inputs_embeds)}")
    if inputs_embeds.dtype != dtype:
        raise TypeError(f"inputs_embeds has dtype {inputs_embeds.dtype} but the model is {dtype}")
    return inputs_embeds
