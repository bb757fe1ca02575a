"""The LLaDA model (GSAI-ML's LLaDA-8B Base/Instruct, LLaDA-1.5): LLaMA-style blocks, bidirectional attention, and
no logit shift (logits row ``i`` predicts position ``i``).

Module and parameter names follow LLaDA's checkpoints (``model.transformer.wte``,
``model.transformer.blocks.N.{attn_norm, q_proj, k_proj, v_proj, attn_out, ff_norm, ff_proj, up_proj, ff_out}``,
``model.transformer.ln_f``, ``model.transformer.ff_out`` for the LM head), so a checkpoint's state dict loads as is
without remote code, and PEFT adapters name the same modules as for LLaDA's own code. The computation is
:mod:`softmask_ext.model.transformer`'s: a block is ``x + attn_out(attention(attn_norm(x)))`` followed by
``x + ff_out(silu(ff_proj(h)) * up_proj(h))`` with ``h = ff_norm(x)`` (``ff_proj`` is the gated projection).
"""

from __future__ import annotations

import torch
from torch import nn

from .family import ModelFamily, register_family
from .kv_cache import LayerCache
from .llada_config import LLaDAConfig
from .loading import PretrainedMixin
from .transformer import DecoderStack, DiffusionTransformer, RMSNorm, qkv_projections, self_attention, swiglu

__all__ = ["LLaDABlock", "LLaDAModel"]


class LLaDABlock(nn.Module):
    """One LLaDA "llama" block: pre-norm attention and SwiGLU MLP, under LLaDA's parameter names."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        hidden, inner = config.hidden_size, config.intermediate_size
        self.attn_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.q_proj, self.k_proj, self.v_proj = qkv_projections(config)
        self.attn_out = nn.Linear(self.n_heads * config.head_dim, hidden, bias=False)
        self.ff_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.ff_proj = nn.Linear(hidden, inner, bias=False)  # gated by silu
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.ff_out = nn.Linear(inner, hidden, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        kv_cache: LayerCache | None = None,
    ) -> torch.Tensor:
        h = self.attn_norm(x)
        x = x + self.attn_out(
            self_attention(
                self.q_proj(h),
                self.k_proj(h),
                self.v_proj(h),
                cos,
                sin,
                attn_mask,
                self.n_heads,
                self.n_kv_heads,
                kv_cache,
            )
        )
        h = self.ff_norm(x)
        return x + self.ff_out(swiglu(self.ff_proj(h), self.up_proj(h)))


class LLaDATransformer(DecoderStack):
    """The ``model.transformer`` of a LLaDA checkpoint: embeddings, blocks, final norm and the LM head."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(LLaDABlock(config) for _ in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ff_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # shares wte when tied

    def layers_and_norm(self) -> tuple[nn.ModuleList, nn.Module]:
        return self.blocks, self.ln_f


class LLaDAModel(PretrainedMixin, DiffusionTransformer):
    """LLaDA masked-diffusion language model (LLaMA-style, bidirectional attention, no logit shift).

    Build with `LLaDAModel(config)` (random weights; under `torch.device("meta")` for no allocation) or load with
    `LLaDAModel.from_pretrained(path, dtype=None, device=None)` (or `softmask_ext.load_model`). The forward is the
    shared one: `model(input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, logits_rows=None)`
    -> `.logits`; see `softmask_ext.model.transformer.DiffusionTransformer.forward`.
    """

    config_class = LLaDAConfig

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        if not isinstance(config, LLaDAConfig):
            raise TypeError(f"config must be a LLaDAConfig, got {type(config).__name__}")
        self.config = config
        self.name_or_path: str | None = None  # absolute, set by from_pretrained; PEFT records it in adapter configs
        self.model = nn.ModuleDict({"transformer": LLaDATransformer(config)})
        self.tie_weights()
        if self.get_output_embeddings().weight.device.type != "meta":
            self.reset_parameters()

    def decoder_stack(self) -> LLaDATransformer:
        return self.model["transformer"]

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model["transformer"].wte

    def get_output_embeddings(self) -> nn.Linear:
        return self.model["transformer"].ff_out


LLaDAModel.family = register_family(
    ModelFamily(
        name="llada",
        model_types=("llada", "LLaDA"),
        logit_shift=0,
        load=LLaDAModel.from_pretrained,
        decoder_layer=LLaDABlock,
        default_decoding={"remasking": "low_confidence", "temperature": 0.0},
        adapter_targets=("q_proj", "k_proj", "v_proj", "attn_out"),
        config_class=LLaDAConfig,
    )
)
