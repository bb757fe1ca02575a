"""Fully sharded data parallel training (FSDP2, ``torch.distributed.fsdp.fully_shard``).

Both trainers use it: :class:`..trainer.Trainer` (Dream, LLaDA) and :class:`..mdlm_trainer.MDLMTrainer` (MDLM).

Layout. Each decoder layer (the model family's ``decoder_layer`` class) is one FSDP unit; the root unit is the whole
:class:`softmask_ext.diffusion.two_pass.DiffusionTrainingForward` (embedding table, final norm, LM head, MDLM's timestep
embedder, and in a PEFT model whatever sits outside the layers). The root is unsharded for the whole of its forward, so
everything the two-pass SM step does around the model (the pass-1 LM head on the selected rows, the blend that reads the
embedding table) sees full weights, and the gradients that reach the table through the blend are reduce-scattered with
the root's. The SM parameters (a few fp32 scalars) are left out of FSDP (``ignored_params``): every process holds them
whole and :func:`..distributed.average_gradients` averages their gradients exactly as DDP does.

Lockstep. FSDP all-gathers a layer's weights inside every forward of that layer, so all processes must run the same
sequence of forwards. A micro-batch whose SM coin came up on some processes and not on others would break that (the SM
processes run pass 1 first); the plain processes then run a pass 1 too and discard it (:class:`ShardedTrainingForward`),
on a forked RNG so that it draws no dropout the real pass would have drawn. The coins are functions of ``(seed,
micro-batch index)``, so every process knows all of them without communicating. Uneven validation splits are padded the
same way by the trainer (the MDLM trainer evaluates the same blocks in every process). The price: at ``sm_prob`` 0.5 a
plain micro-batch almost always has an SM partner elsewhere, so it pays one extra forward without gradient, the same
overhead an SM micro-batch has.

Precision. With bf16 (on GPUs) the layers compute with bf16 weights all-gathered in bf16 and reduce gradients in fp32;
the sharded weights, and so the optimizer, keep their own dtype (fp32 for trained weights).

When. The trainers' ``fsdp`` option (``--fsdp``) asks for it; with several processes on GPUs it is also chosen when the
estimated training memory (:func:`estimate_training_bytes`: weights, plus gradient and two AdamW moments for every
trainable weight; activations not counted) exceeds :data:`FIT_FRACTION` of one GPU's memory. One process has nothing to
shard across, so ``fsdp`` there is an error.

Checkpoints. Full (unsharded) trainable weights are gathered to CPU on rank 0 and written in the usual formats
(``model.safetensors`` through the model's ``save_pretrained``, PEFT adapters through peft's), and other sharded state
(the MDLM trainer's EMA) by :func:`gather_full_tensors`; optimizer state goes through
``torch.distributed.checkpoint.state_dict`` with full, CPU-offloaded state dicts, keyed by parameter name. So the files
are those of one process.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..conventions import ADAPTER_WEIGHTS, MODEL_WEIGHTS
from ..diffusion.two_pass import DiffusionTrainingForward, model_logits
from ..model.family import family_of
from .adapters import AdapterConfig
from .distributed import DistEnv

__all__ = [
    "FIT_FRACTION",
    "FULL_STATE",
    "ShardedTrainingForward",
    "estimate_training_bytes",
    "use_fsdp",
    "check_fsdp_request",
    "shard",
    "clip_grad_norm",
    "gather_trainable_state",
    "gather_full_tensors",
    "save_trainable_state",
    "load_full_state",
    "load_trainable_sharded",
]

FIT_FRACTION = 0.8  # share of one GPU's memory the weights, gradients and optimizer state may take before we shard

# Full (unsharded) tensors, on CPU, on rank 0 only (the other ranks get empty dicts).
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
_FULL_TRAINABLE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


class ShardedTrainingForward(DiffusionTrainingForward):
    """:class:`DiffusionTrainingForward` that keeps FSDP processes in lockstep.

    ``forward(x_t, attention_mask, soft, lockstep_pass1=False)``: with ``lockstep_pass1`` a plain micro-batch first
    runs a pass 1 without gradient whose result is discarded (one LM-head row), because another process runs the
    two-pass SM forward on this micro-batch and the two must issue the same all-gathers. The discarded pass runs on
    a forked RNG: with dropout, the real pass then draws the masks it draws in one process.
    """

    def forward(self, x_t: Tensor, attention_mask: Tensor | None, soft: bool, lockstep_pass1: bool = False) -> Tensor:
        if lockstep_pass1 and not soft:
            devices = [x_t.device] if x_t.device.type != "cpu" else []
            with torch.no_grad(), torch.random.fork_rng(devices, device_type=x_t.device.type):
                model_logits(self.model, input_ids=x_t, attention_mask=attention_mask, logits_rows=x_t.new_zeros(1))
        return super().forward(x_t, attention_mask, soft)


def estimate_training_bytes(model: nn.Module) -> int:
    """Bytes of the weights plus, for each trainable weight, its gradient and AdamW's two moments (same dtype).

    Activations are not counted (gradient checkpointing keeps them small next to a 7B model's optimizer state).
    """
    total = 0
    for p in model.parameters():
        size = p.numel() * p.element_size()
        total += size * (4 if p.requires_grad else 1)
    return total


def check_fsdp_request(fsdp: bool, env: DistEnv) -> None:
    """A clear error for FSDP in a single process (nothing to shard across)."""
    if fsdp and not env.distributed:
        raise ValueError(
            "FSDP shards the model across processes, and this is a single process: launch with "
            "`torchrun --nproc_per_node N ...` (N >= 2), or drop --fsdp (fsdp=False in the training config)"
        )


def use_fsdp(requested: bool, env: DistEnv, model: nn.Module, device: torch.device) -> bool:
    """Whether to shard: when asked, or with several processes on GPUs when training would not fit one GPU
    (:func:`estimate_training_bytes` above ``FIT_FRACTION`` of the device's memory)."""
    check_fsdp_request(requested, env)
    if requested:
        return True
    if not env.distributed or device.type != "cuda":
        return False
    return estimate_training_bytes(model) > FIT_FRACTION * torch.cuda.get_device_properties(device).total_memory


def shard(forward: ShardedTrainingForward, env: DistEnv, device: torch.device, bf16: bool) -> None:
    """Apply FSDP2 in place: each decoder layer, then the root (all but the SM parameters, if any).

    bf16: compute in bf16 (parameters all-gathered in bf16), reduce gradients in fp32; the sharded parameters keep
    their own dtype (fp32 for trained weights).
    """
    # The root returns the model's logits, which a biased LM head (MDLM's) makes a view of its GEMM output; FSDP warns
    # about views because an in-place update would skip its backward hook, and nothing updates the logits in place.
    warnings.filterwarnings("ignore", re.escape(f"FSDP2-wrapped module (FSDP{type(forward).__name__}) returned a view"))
    mesh = init_device_mesh(device.type, (env.world_size,))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    decoder_layer = family_of(forward.model).decoder_layer
    layers = [m for m in forward.modules() if isinstance(m, decoder_layer)]
    if not layers:
        raise TypeError(f"FSDP found no {decoder_layer.__name__} to shard in {type(forward.model).__name__}")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    replicated = set(forward.soft_mask.parameters()) if forward.soft_mask is not None else set()
    fully_shard(forward, mesh=mesh, mp_policy=policy, ignored_params=replicated)
    # Backward prefetch follows the recorded forward order by default, which the no-gradient pass 1 would pollute;
    # name the previous layer explicitly instead.
    for later, earlier in zip(layers[1:], layers[:-1]):
        later.set_modules_to_backward_prefetch([earlier])


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a mix of sharded (DTensor) and replicated parameters; returns the
    total norm over all of them (a plain tensor, the same in every process)."""
    params = [p for p in params if p.grad is not None]
    groups = [[p for p in params if isinstance(p, DTensor)], [p for p in params if not isinstance(p, DTensor)]]
    norms = []
    for group in groups:
        if group:
            norm = torch.nn.utils.get_total_norm([p.grad for p in group])
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.nn.utils.get_total_norm(norms)
    for group in groups:
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def gather_trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """Full trainable weights (and buffers) of a sharded ``model`` by name, on CPU on rank 0; empty elsewhere.
    Collective: every process must call it."""
    return get_model_state_dict(model, options=_FULL_TRAINABLE)


def gather_full_tensors(tensors: Mapping[str, Tensor], keep: bool) -> dict[str, Tensor]:
    """Whole CPU copies of ``tensors`` (sharded DTensors gathered, others copied), returned where ``keep`` (rank 0)
    and empty elsewhere. Collective when any is sharded: every process must call it with the same names."""
    out = {}
    for name, t in tensors.items():
        whole = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            out[name] = whole.detach().cpu().contiguous()
    return out


def save_trainable_state(model: nn.Module, state: dict[str, Tensor], directory: Path) -> None:
    """Write ``state`` (from :func:`gather_trainable_state`) as ``model.save_pretrained`` would: PEFT adapters, or
    the whole model (built on the meta device around the gathered tensors, so nothing is copied)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.save_pretrained(directory, state_dict=state)
        return
    with torch.device("meta"):
        shell = type(model)(model.config)
    shell.load_state_dict(state, strict=False, assign=True)
    missing = [name for name, p in shell.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"cannot save the model: the gathered state lacks {missing}")
    shell.save_pretrained(directory)


def _peft_names(model: nn.Module) -> dict[str, str]:
    """Adapter-file key -> parameter name, by peft's own renaming (applied to the model's state dict)."""
    from peft import get_peft_model_state_dict

    state = model.state_dict()
    name_of = {id(v): k for k, v in state.items()}
    return {key: name_of[id(v)] for key, v in get_peft_model_state_dict(model, state_dict=state).items()}


def load_trainable_sharded(model: nn.Module, config: AdapterConfig, directory: Path) -> None:
    """:func:`.adapters.load_trainable` for a sharded model: read the full tensors in every process and keep each
    process's shard. Every trainable tensor must be in the checkpoint. Collective."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if config.kind == "full":
        state = load_file(str(directory / MODEL_WEIGHTS))
        if model.config.tie_word_embeddings:
            trainable.discard("lm_head.weight")
    else:
        names = _peft_names(model)
        saved = load_file(str(directory / ADAPTER_WEIGHTS))
        unknown = sorted(set(saved) - set(names))
        if unknown:
            raise ValueError(f"{directory}: adapter weights do not match the model: {unknown}")
        state = {names[key]: value for key, value in saved.items()}
    missing, unexpected = sorted(trainable - set(state)), sorted(set(state) - {n for n, _ in model.named_parameters()})
    if missing or unexpected:
        raise ValueError(
            f"{directory}: checkpoint does not match the model (missing {missing}, unexpected {unexpected})"
        )
    load_full_state(model, state, strict=False)


def load_full_state(model: nn.Module, state: dict[str, Tensor], strict: bool = True) -> None:
    """Load full tensors by name (the same in every process) into a sharded or unsharded ``model``: each process
    keeps its shard. Collective for a sharded model."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))
