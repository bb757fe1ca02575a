"""Checkpoint I/O shared by the model families: config.json + safetensors (single file, or shards with an index).

Only safetensors are read; pickle-based weights (`*.bin`, `*.pt`, `*.pth`) are refused because unpickling runs
arbitrary code. Tensor names are the model's own state-dict names, which each family chooses to be its checkpoints'
(Dream: Qwen2's `model.layers.N.self_attn.q_proj.weight`; LLaDA: `model.transformer.blocks.N.q_proj.weight`).

A folder of PEFT LoRA/DoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``, what fine-tuning writes
for an adapter run) loads as its base model with the adapters merged into the weights.

Loading builds the model on the meta device (no memory), checks every tensor's name and shape from the file headers
before reading any data, then reads each tensor straight onto the target device and assigns it, so weights are
materialised once (plus a transient per-tensor cast when the requested dtype differs from the stored one).

A model class that loads through here subclasses :class:`~.transformer.DiffusionTransformer` and names its config class
(``config_class``, with ``from_pretrained(path)``, ``save_pretrained(path)``, a ``torch_dtype`` field and
``tie_word_embeddings``).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..conventions import ADAPTER_CONFIG, ADAPTER_WEIGHTS, DTYPE_NAMES, MODEL_INDEX, MODEL_WEIGHTS
from .transformer import DiffusionTransformer

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "pytorch_model.bin.index.json")
SUPPORTED_DTYPES = tuple(DTYPE_NAMES.values())
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# Non-parameter buffers some exports contain; we compute them instead.
IGNORED_TENSOR = re.compile(r".*rotary_emb\.inv_freq$")
SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


class PretrainedMixin:
    """``from_pretrained`` / ``save_pretrained`` through this module, for a :class:`~.transformer.DiffusionTransformer`
    subclass that names its ``config_class``."""

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        base_model: str | os.PathLike | None = None,
    ) -> DiffusionTransformer:
        """Load a checkpoint directory of this family (safetensors only, one file or shards with an index), or a
        folder of LoRA/DoRA adapters merged into their base model (``base_model`` overrides the one it records)."""
        return load_pretrained(cls, path, dtype=dtype, device=device, base_model=base_model)

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        """Write config.json (the family's field names) and safetensors (sharded with an index above
        ``max_shard_size``)."""
        save_pretrained(self, path, max_shard_size=max_shard_size)


def load_pretrained(
    model_class: type[DiffusionTransformer],
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    base_model: str | os.PathLike | None = None,
) -> DiffusionTransformer:
    """Load a checkpoint directory into a `model_class` model in eval mode.

    Args:
        model_class: the family's model class (e.g. `DreamModel`, `LLaDAModel`).
        path: directory with config.json and model.safetensors, or model.safetensors.index.json and its shards; or
            a folder of PEFT adapters, loaded onto their base model and merged into its weights.
        dtype: torch.float32 / bfloat16 / float16; None keeps the dtype the embeddings are stored in.
        device: where the weights go (default CPU); tensors are read directly onto it.
        base_model: for an adapter folder, the base checkpoint (default: the ``base_model_name_or_path`` the adapters
            recorded, i.e. where the fine-tuned model was loaded from).
    """
    path = os.fspath(path)
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    if os.path.exists(os.path.join(path, ADAPTER_CONFIG)) and not os.path.exists(os.path.join(path, "config.json")):
        return _load_merged_adapters(model_class, path, dtype, device, base_model)
    if base_model is not None:
        raise ValueError(f"base_model is for adapter folders; {path!r} is a full checkpoint")
    config = model_class.config_class.from_pretrained(path)
    device = torch.device(device if device is not None else "cpu")
    weight_map = _weight_map(path)

    with torch.device("meta"):
        model = model_class(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    embedding_name = model.weight_name(model.get_input_embeddings())
    head_name = model.weight_name(model.get_output_embeddings())
    if config.tie_word_embeddings:
        del expected[head_name]  # shared with the embedding table
    stored = _check_tensors(path, weight_map, expected, optional={head_name})

    if dtype is None:
        dtype = stored[embedding_name]

    state = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(os.path.join(path, shard), framework="pt", device=str(device)) as f:
            for name in f.keys():
                if name in expected:
                    state[name] = f.get_tensor(name).to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # assignment replaced the shared parameter
    model.name_or_path = os.path.abspath(path)  # PEFT records it as the adapters' base: valid from any directory
    return model.eval()


def _load_merged_adapters(
    model_class: type[DiffusionTransformer],
    path: str,
    dtype: torch.dtype | None,
    device: str | torch.device | None,
    base_model: str | os.PathLike | None,
) -> DiffusionTransformer:
    """The base model of the adapters in ``path`` with every adapter tensor checked and merged into its weights."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import check_target_module_exists
    from safetensors.torch import load_file

    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{path!r} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS} (only safetensors are read)")
    lora = LoraConfig.from_pretrained(path)
    base = os.fspath(base_model) if base_model is not None else lora.base_model_name_or_path
    if not base or not os.path.isdir(base):
        raise FileNotFoundError(
            f"the adapters in {path!r} belong to the base model {base!r}, which is not a directory here; "
            f"pass the base checkpoint as base_model= (--base-model on the command line)"
        )
    lora.base_model_name_or_path = os.path.abspath(base)
    model = load_pretrained(model_class, base, dtype=dtype, device=device)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if model.config.tie_word_embeddings and any(
        check_target_module_exists(lora, model.weight_name(module).removesuffix(".weight"))
        for module in (head, embedding)
    ):
        # Merging into a shared table would change both ends; the adapted model has them apart, and so will this one.
        model.config.tie_word_embeddings = False
        head.weight = torch.nn.Parameter(embedding.weight.detach().clone())
    model = get_peft_model(model, lora)
    result = set_peft_model_state_dict(model, load_file(weights, device=str(model.device)))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"{path!r}: the adapters do not match the base model {base!r} "
            f"(unexpected {result.unexpected_keys}, missing {missing})"
        )
    merged = model.merge_and_unload()
    merged.name_or_path = os.path.abspath(path)
    return merged.eval()


def _weight_map(path: str) -> dict[str, str]:
    """tensor name -> file name, from the index or from the single file's header."""
    index_path = os.path.join(path, MODEL_INDEX)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path!r} is not a valid safetensors index (needs a 'weight_map'): {e}") from None
        missing_shards = sorted({s for s in weight_map.values() if not os.path.exists(os.path.join(path, s))})
        if missing_shards:
            raise FileNotFoundError(f"{index_path!r} names shard files that are not there: {missing_shards}")
        return weight_map
    single = os.path.join(path, MODEL_WEIGHTS)
    if os.path.exists(single):
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), MODEL_WEIGHTS)
    pickled = sorted(os.path.basename(p) for pat in PICKLE_PATTERNS for p in glob.glob(os.path.join(path, pat)))
    if pickled:
        raise ValueError(
            f"{path!r} holds only pickle-based weights ({', '.join(pickled)}); they are not loaded because unpickling "
            "can run arbitrary code. Convert them to safetensors (model.safetensors or shards + index) first."
        )
    raise FileNotFoundError(f"no {MODEL_WEIGHTS} or {MODEL_INDEX} in {path!r}")


def _check_tensors(
    path: str, weight_map: dict[str, str], expected: dict[str, tuple[int, ...]], optional: set[str]
) -> dict[str, torch.dtype]:
    """Compare file headers with the model; raise one error listing every problem. Returns name -> stored dtype.
    ``optional`` names tensors a file may hold that are not read (the LM head of a tied model, stored as a copy of
    the embedding table)."""
    shapes, dtypes = {}, {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(os.path.join(path, shard), framework="pt") as f:
            for name in f.keys():
                if weight_map.get(name) != shard:
                    continue  # the index is authoritative about where a tensor lives
                info = f.get_slice(name)
                shapes[name] = tuple(info.get_shape())
                dtypes[name] = SAFETENSORS_DTYPES.get(info.get_dtype(), info.get_dtype())
    listed_not_found = sorted(set(weight_map) - set(shapes))
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(n for n in shapes if n not in expected and not IGNORED_TENSOR.match(n) and n not in optional)
    misshaped = [
        f"{n}: file {list(shapes[n])} vs model {list(expected[n])}"
        for n in sorted(set(expected) & set(shapes))
        if shapes[n] != expected[n]
    ]
    bad_dtype = [f"{n}: {dtypes[n]}" for n in sorted(set(expected) & set(dtypes)) if dtypes[n] not in SUPPORTED_DTYPES]
    problems = []
    for title, items in (
        ("missing tensors", missing),
        ("unexpected tensors", unexpected),
        ("tensors whose shape does not match config.json", misshaped),
        ("tensors the index names but no shard holds", listed_not_found),
        ("tensors of an unsupported dtype (need F32/BF16/F16)", bad_dtype),
    ):
        if items:
            shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
            problems.append(f"{title}: {shown}")
    if problems:
        raise ValueError(f"checkpoint {path!r} does not match its config.json:\n  " + "\n  ".join(problems))
    return dtypes


def save_pretrained(model: DiffusionTransformer, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
    """Write config.json (the family's model_type) and the weights: model.safetensors, or
    model-0000i-of-0000n.safetensors shards + model.safetensors.index.json when larger than `max_shard_size`
    (bytes, or a string such as "5GB" / "500MB" / "2GiB"). Weight files from an earlier save in `path` are replaced."""
    if not isinstance(model, DiffusionTransformer):
        raise TypeError(f"save_pretrained needs a model of a registered family, got {type(model).__name__}")
    path = os.fspath(path)
    limit = _parse_size(max_shard_size)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        del state[model.weight_name(model.get_output_embeddings())]

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size

    os.makedirs(path, exist_ok=True)
    names = (
        [MODEL_WEIGHTS]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    _remove_stale_weights(path, keep=set(names))
    for file_name, shard in zip(names, shards):
        save_file(
            {n: t.detach().to("cpu").contiguous() for n, t in shard.items()},
            os.path.join(path, file_name),
            metadata={"format": "pt"},
        )
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {n: f for f, shard in zip(names, shards) for n in shard},
        }
        with open(os.path.join(path, MODEL_INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
    dtype_name = str(model.dtype).removeprefix("torch.")
    dataclasses.replace(model.config, torch_dtype=dtype_name).save_pretrained(path)


def _remove_stale_weights(path: str, keep: set[str]) -> None:
    """Delete weight files of an earlier save that the new one does not overwrite (an old index would win)."""
    for name in os.listdir(path):
        if name not in keep and (name in (MODEL_WEIGHTS, MODEL_INDEX) or SHARD_NAME.match(name)):
            os.remove(os.path.join(path, name))


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", str(size).upper()) if isinstance(size, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes or a string like '5GB', got {size!r}")
    return int(float(match.group(1)) * units[match.group(2)])
