"""Generate text with a Dream or LLaDA checkpoint (any supported family) by (soft-masked) diffusion decoding.

    python -m softmask_ext.generate --model DIR --prompt "Write a function that reverses a string."
    python -m softmask_ext.generate --prompt-file task.txt --soft-mask DIR/transparency_config.json --live

Instruct checkpoints (a ``chat_template`` in their tokenizer config) get the prompt as a user turn of the chat
template. Mask tokens written in the prompt (``<|mask|>``) are filled in too, and the text from the first of them on is
printed (infilling: ``--no-chat-template --max-new-tokens 0``; with a chat template the rest of the template would be
printed too). The final text goes to stdout; ``--live`` redraws the canvas on stderr after every step, each mask shown
as a shaded block. Without ``--model`` the tiny model shipped in ``softmask_ext/assets/tiny-coder`` is used.
Without ``--soft-mask``, a ``transparency_config.json`` beside the weights is used (``--binary`` ignores it). A
config whose ``transparency_alg`` is ``"none"`` (what binary fine-tuning writes) means binary decoding.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import torch

from .cli_errors import add_debug_flag, user_errors
from .conventions import ADAPTER_CONFIG, DTYPE_NAMES, SHIPPED_MODEL, default_device
from .cpu_threads import configure_cpu_threads
from .decoding import ALGS, add_fast_decoding_flags, diffusion_generate, dream_keywords, fast_decoding_kwargs
from .mdlm_cli import generate_main
from .model import load_model, load_tokenizer
from .model.family import checkpoint_model_type
from .model.file_checks import check_weight_files
from .soft_mask import CONFIG_FILENAME, SoftMask

MASK_GLYPH = "\u2591"  # light shade: one per masked position


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m softmask_ext.generate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        help=f"checkpoint directory, or a fine-tuning run's adapter folder (default: the shipped "
        f"tiny model, {SHIPPED_MODEL})",
    )
    p.add_argument(
        "--base-model",
        help="the base checkpoint of an adapter folder given as --model (default: the one the adapters recorded)",
    )
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", help="read the prompt from this file ('-' for stdin)")
    sm = p.add_mutually_exclusive_group()
    sm.add_argument(
        "--soft-mask",
        metavar="JSON",
        help="transparency_config.json to decode with soft-masking (transparency_alg 'none': binary)",
    )
    sm.add_argument("--binary", action="store_true", help="plain masks even if the checkpoint has a soft-mask config")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, help="denoising steps (default: one token per step)")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int)
    p.add_argument("--alg", choices=ALGS, default="entropy")
    p.add_argument("--alg-temp", type=float)
    p.add_argument("--seed", type=int, default=0)
    add_fast_decoding_flags(p)
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as is, even to Instruct models")
    p.add_argument("--live", action="store_true", help="show the canvas being denoised, step by step (stderr)")
    p.add_argument("--sampler", default="mdlm", help="MDLM checkpoints: mdlm, remdm-cap or remdm-loop")
    p.add_argument("--eta", type=float, help="MDLM checkpoints: ReMDM's remasking rate (default: ReMDM's)")
    add_debug_flag(p)
    return p


def render(tokenizer, ids: Sequence[int], mask_token_id: int) -> str:
    """Text of ``ids`` with ``MASK_GLYPH`` for each mask (runs of real tokens decoded together)."""
    parts: list[str] = []
    run: list[int] = []
    for token in ids:
        if token == mask_token_id:
            if run:
                parts.append(tokenizer.decode(run))
                run = []
            parts.append(MASK_GLYPH)
        else:
            run.append(token)
    if run:
        parts.append(tokenizer.decode(run))
    return "".join(parts)


def final_text(tokenizer, ids: Sequence[int]) -> str:
    """The answer: generated tokens up to the first end-of-sequence token, special tokens dropped."""
    stops = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    ids = list(ids)
    for i, token in enumerate(ids):
        if token in stops:
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=True)


class LiveView:
    """A tokens hook that redraws the decoded region (from position ``start`` on) after every step."""

    def __init__(self, tokenizer, start: int, steps: int, mask_token_id: int, stream: TextIO) -> None:
        self.tokenizer, self.start, self.steps = tokenizer, start, steps
        self.mask_token_id, self.stream = mask_token_id, stream
        self.redraw = stream.isatty()

    def __call__(self, step: int | None, x: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        text = render(self.tokenizer, x[0, self.start :].tolist(), self.mask_token_id)
        header = f"step {0 if step is None else step + 1}/{self.steps}"
        if self.redraw:
            self.stream.write("\x1b[2J\x1b[H")  # clear the screen, cursor home
        self.stream.write(f"--- {header} ---\n{text}\n")
        self.stream.flush()
        return x


def _resolve_model_dir(arg: str | None) -> Path:
    path = Path(arg) if arg else SHIPPED_MODEL
    if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
        if arg:
            raise SystemExit(f"error: {path} is not a checkpoint directory (no config.json or {ADAPTER_CONFIG})")
        raise SystemExit(
            f"error: the shipped tiny model is missing ({SHIPPED_MODEL}); pass --model DIR with a model checkpoint"
        )
    return path


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8")
    except OSError as e:
        raise SystemExit(f"error: cannot read --prompt-file: {e}") from None


def _soft_mask(args: argparse.Namespace, model_dir: Path) -> SoftMask | None:
    if args.binary:
        return None
    if args.soft_mask:
        return SoftMask.from_transparency_config(args.soft_mask)
    beside = SoftMask.beside(model_dir)
    if beside is not None:
        print(f"using the soft-mask config {model_dir / CONFIG_FILENAME} (--binary to decode without)", file=sys.stderr)
    return beside


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps} (leave it out for one token per step)")
    configure_cpu_threads()
    with user_errors(args.debug):
        return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    model_dir = _resolve_model_dir(args.model)
    device = torch.device(args.device) if args.device else default_device()
    dtype = DTYPE_NAMES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if checkpoint_model_type(str(model_dir)) == "mdlm":  # MDLM/ReMDM sampling; --top-p is the nucleus
        return generate_main(args, model_dir, device, DTYPE_NAMES.get(args.dtype), _read_prompt(args))
    try:
        soft_mask = _soft_mask(args, model_dir)
        tokenizer = load_tokenizer(model_dir)
        check_weight_files(model_dir)
        model = load_model(model_dir, dtype=dtype, device=device, base_model=args.base_model).eval()
    except TypeError as e:
        raise SystemExit(f"error: {e}") from None

    text = _read_prompt(args)
    if tokenizer.chat_template and not args.no_chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    else:
        ids = tokenizer(text)["input_ids"]
    input_ids = torch.tensor([ids], dtype=torch.int64, device=device)

    mask_token_id = model.config.mask_token_id
    prompt_masks = ids.count(mask_token_id)
    start = ids.index(mask_token_id) if prompt_masks else len(ids)  # the first position decoded
    # With nothing to decode, one step: the library then says there is nothing to do.
    steps = args.steps if args.steps is not None else max(args.max_new_tokens + prompt_masks, 1)
    hook = LiveView(tokenizer, start, steps, mask_token_id, sys.stderr) if args.live else None
    try:
        out = diffusion_generate(
            model,
            input_ids,
            max_new_tokens=args.max_new_tokens,
            steps=steps,
            temperature=args.temperature,
            **dream_keywords(model, top_p=args.top_p, top_k=args.top_k, alg=args.alg, alg_temp=args.alg_temp),
            seed=args.seed,
            soft_mask=soft_mask,
            generation_tokens_hook_func=hook,
            **fast_decoding_kwargs(args),
        )
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from None
    print(final_text(tokenizer, out[0, start:].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
