"""Train the shipped tiny Dream-architecture code model from scratch: ``python -m softmask_ext.pretrain``.

Binary masked-diffusion (MDLM) pretraining on the Python standard library's own source (the fixed module split of
:mod:`softmask_ext.data.stdlib_corpus`): a byte-level BPE tokenizer is trained on the train split, the corpus is
packed into fixed-length blocks, and a small Dream model (Qwen2 with bidirectional attention) learns with
``t ~ U[1e-3, 1]``, loss weight ``1/t``, all weights trained, no soft-masking. The result goes to ``--output``
(default ``runs/tiny-coder``; the shipped model is ``--output softmask_ext/assets/tiny-coder``): ``config.json`` with
``model_type`` Dream, ``model.safetensors``, tokenizer files with a chat template, ``metadata.json`` and
``README.md`` with the held-out loss against a unigram baseline and the time it took; the training run goes to
``--work-dir``.

The held-out number is the negative ELBO per token (nats) on the validation modules, averaged over a fixed set of
noise draws; a model that ignores context and predicts the training unigram distribution at every masked position
scores exactly the unigram cross-entropy of the validation tokens on the same scale, which is the baseline.

``--family mdlm`` trains a DiT MDLM instead (binary pretraining or soft-masked continued pretraining, the authors'
recipes): :mod:`softmask_ext.mdlm_pretrain` takes the other arguments (``--family mdlm --help`` lists them).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from .conventions import MODEL_WEIGHTS, SHIPPED_MODEL
from .data import save_tokenizer, stdlib_dataset, stdlib_texts, train_tokenizer
from .mdlm_pretrain import main as mdlm_main
from .model import DreamConfig, DreamModel, load_tokenizer
from .training import PRETRAIN_NOISE, AdapterConfig, TrainConfig, Trainer

MAX_WEIGHT_BYTES = 25 * 10**6
FAMILIES = ("dream", "mdlm")


def unigram_cross_entropy(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of ``val_ids`` under the add-one-smoothed unigram distribution of ``train_ids``."""
    counts = torch.bincount(train_ids.flatten(), minlength=vocab_size).double() + 1.0
    log_p = counts.log() - counts.sum().log()
    return float(-log_p[val_ids.flatten()].mean())


_FAMILY_OPTION = dict(
    choices=FAMILIES,
    default="dream",
    help="dream: this tiny code model (the options here); mdlm: a DiT MDLM (--family mdlm --help)",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m softmask_ext.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", **_FAMILY_OPTION)
    p.add_argument(
        "--output",
        type=Path,
        default=Path("runs/tiny-coder"),
        help=f"where the finished model is written (the shipped one: {SHIPPED_MODEL})",
    )
    p.add_argument("--work-dir", type=Path, default=Path("runs/pretrain-tiny-coder"), help="training run folder")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden-size", type=int, default=192)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=512)
    p.add_argument("--max-positions", type=int, default=2048, help="max_position_embeddings in config.json")
    p.add_argument("--seq-len", type=int, default=128, help="length of the packed training blocks")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=4000)
    # 5e-4: the lowest held-out loss among 3e-3, 1e-3, 5e-4 and 2e-4 in short runs of this model size.
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW, warmup then cosine)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--max-chars", type=int, default=None, help="cap on the corpus size (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue the run in --work-dir from its latest checkpoint")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    family = argparse.ArgumentParser(prog="python -m softmask_ext.pretrain", add_help=False)
    family.add_argument("--family", **_FAMILY_OPTION)
    chosen, rest = family.parse_known_args(argv)
    if chosen.family == "mdlm":  # a DiT MDLM: its own options, in softmask_ext.mdlm_pretrain
        return mdlm_main(rest)
    args = parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    tokenizer_dir = args.work_dir / "tokenizer"
    if not (args.resume and (tokenizer_dir / "tokenizer.json").exists()):
        print(f"training a {args.vocab_size}-token BPE tokenizer on the standard library's train split ...")
        save_tokenizer(
            train_tokenizer(stdlib_texts("train", args.max_chars), args.vocab_size),
            tokenizer_dir,
            model_max_length=args.max_positions,
        )
    tokenizer = load_tokenizer(tokenizer_dir)
    print("tokenizing and packing the corpus ...")
    train = stdlib_dataset(tokenizer, "train", args.seq_len, args.max_chars)
    val = stdlib_dataset(tokenizer, "validation", args.seq_len, args.max_chars)
    print(f"train: {train.report.summary()}\nvalidation: {val.report.summary()}")

    special = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["special_token_ids"]
    config = DreamConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        mask_token_id=special["mask"],
        pad_token_id=special["pad"],
        eos_token_id=special["eos"],
        bos_token_id=special["bos"],
    )
    model = DreamModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    if n_params * 4 > MAX_WEIGHT_BYTES:
        raise ValueError(f"{n_params / 1e6:.1f}M parameters exceed the {MAX_WEIGHT_BYTES / 1e6:.0f} MB fp32 budget")
    train_config = TrainConfig(
        run_dir=str(args.work_dir),
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        clip=args.clip,
        sm_prob=0.0,
        noise=PRETRAIN_NOISE,
        seed=args.seed,
        adapter=AdapterConfig(kind="full"),
        save_every=args.save_every,
        eval_every=max(1, args.max_steps // 4),
        eval_batches=args.eval_batches,
    )
    trainer = Trainer(model, train, train_config, val_data=val, tokenizer=tokenizer, device="cpu")
    if args.resume and trainer.resume():
        print(f"resumed at step {trainer.step}")
    summary = trainer.train()

    train_ids = torch.stack([e.input_ids for e in train.examples])
    val_ids = torch.stack([e.input_ids for e in val.examples[: args.eval_batches * args.batch_size]])
    unigram = unigram_cross_entropy(train_ids, val_ids, config.vocab_size)
    elapsed = time.perf_counter() - started
    metadata = {
        "command": "python -m softmask_ext.pretrain",
        "arguments": {k: v for k, v in vars(args).items() if k not in ("output", "work_dir", "resume", "family")},
        "parameters": n_params,
        "train_tokens_seen": args.max_steps * args.batch_size * args.seq_len,
        "train_corpus_tokens": train.report.n_tokens,
        "heldout_loss_nats": summary["val_binary"],
        "heldout_perplexity_bound": math.exp(summary["val_binary"]),
        "unigram_baseline_nats": unigram,
        "heldout_loss_definition": "MDLM negative ELBO per token, t ~ U[1e-3, 1], fixed noise, validation modules",
        "training_seconds": round(summary["train_seconds"], 1),
        "total_seconds": round(elapsed, 1),
        "torch_threads": torch.get_num_threads(),
    }
    write_assets(model, tokenizer_dir, args.output, metadata)
    print(json.dumps({k: metadata[k] for k in ("heldout_loss_nats", "unigram_baseline_nats", "total_seconds")}))
    print(f"model written to {args.output}")
    return metadata


def write_assets(model: DreamModel, tokenizer_dir: Path, output: Path, metadata: dict) -> None:
    """The model directory: config.json + model.safetensors + tokenizer files + metadata.json + README.md."""
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, output / name)
    (output / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    size = (output / MODEL_WEIGHTS).stat().st_size
    a = metadata["arguments"]
    (output / "README.md").write_text(
        "# tiny-coder\n\n"
        f"A {metadata['parameters'] / 1e6:.1f}M-parameter Dream-architecture masked diffusion model (hidden "
        f"{a['hidden_size']}, {a['layers']} layers, {a['heads']} heads / {a['kv_heads']} KV heads, MLP "
        f"{a['intermediate_size']}, vocabulary {a['vocab_size']}) trained from scratch with binary masking on the "
        "Python standard library's source (train split of `softmask_ext.data.stdlib_corpus`), "
        f"blocks of {a['seq_len']} tokens.\n\n"
        f"Command: `{metadata['command']}` ({metadata['total_seconds'] / 60:.1f} minutes on "
        f"{metadata['torch_threads']} CPU threads; {metadata['train_tokens_seen'] / 1e6:.2f}M training tokens).\n\n"
        f"Held-out loss (validation modules, MDLM negative ELBO per token): **{metadata['heldout_loss_nats']:.3f} "
        f"nats** vs **{metadata['unigram_baseline_nats']:.3f} nats** for a unigram model.\n\n"
        f"Weights: fp32 safetensors, {size / 1e6:.1f} MB. It exists to make every command of this package runnable "
        "on a laptop; it is not a useful code model.\n"
    )


if __name__ == "__main__":
    main()
