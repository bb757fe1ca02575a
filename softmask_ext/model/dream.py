"""The Dream model: Qwen2 with bidirectional attention, in the shared transformer blocks' Qwen2 layout.

Module and parameter names follow the Qwen2 checkpoint layout (`model.layers.N.self_attn.q_proj.weight`, ...), so a
checkpoint's state dict loads as is and PEFT adapters are named as for the reference implementation. The computation
itself (attention, MLP, norms, rotary embeddings, the forward's masks and rows) is `softmask_ext.model.transformer`'s.
"""

from __future__ import annotations

from torch import nn

from .config import DreamConfig
from .family import ModelFamily, register_family
from .loading import PretrainedMixin
from .transformer import DecoderLayer, DecoderStack, DiffusionTransformer, LMOutput, RMSNorm

DreamOutput = LMOutput  # the name Dream's users know


class DreamBackbone(DecoderStack):
    """Embeddings, decoder layers and the final norm: the `model.` prefix of the checkpoint."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__(config)
        # padding_idx as in Qwen2/Dream: the pad row gets no gradient from the lookup
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def layers_and_norm(self) -> tuple[nn.ModuleList, nn.Module]:
        return self.layers, self.norm


class DreamModel(PretrainedMixin, DiffusionTransformer):
    """Dream masked-diffusion language model (Qwen2 architecture, bidirectional attention).

    Build with `DreamModel(config)` (random weights; under `torch.device("meta")` for no allocation) or load with
    `DreamModel.from_pretrained(path, dtype=None, device=None)`.
    """

    config_class = DreamConfig

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        if not isinstance(config, DreamConfig):
            raise TypeError(f"config must be a DreamConfig, got {type(config).__name__}")
        self.config = config
        self.name_or_path: str | None = None  # absolute, set by from_pretrained; PEFT records it in adapter configs
        self.model = DreamBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        if self.lm_head.weight.device.type != "meta":
            self.reset_parameters()

    def decoder_stack(self) -> DreamBackbone:
        return self.model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head


DreamModel.family = register_family(
    ModelFamily(
        name="dream",
        model_types=("Dream", "qwen2"),
        logit_shift=1,
        load=DreamModel.from_pretrained,
        decoder_layer=DecoderLayer,
        default_decoding={"alg": "entropy", "eps": 1e-3},
        adapter_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        config_class=DreamConfig,
    )
)
