"""Can soft-masking start from the paper's initialisation on a given model? ``python experiments/sm_start_gradient.py``

At the paper's start the scale is ~1e-6, the model has never seen a soft input, and only the gradient of the loss
with respect to the scale can move it: the SM parameters' optimizer (Adam) travels in the direction of that gradient's
sign, about ``lr`` per update when the sign is the same batch after batch, and not at all when it is noise. This
script measures that gradient per training batch (stdlib train split, fine-tuning noise t ~ U[0.2, 0.8], the
trainer's SM loss) for the paper's gate and for the gate centred on the model's median confidence, with the pass-1
top-1 accuracy at masked positions, and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from softmask_ext.conventions import SHIPPED_MODEL
from softmask_ext.data import stdlib_dataset
from softmask_ext.model import load_model, load_tokenizer
from softmask_ext.soft_mask import SoftMask
from softmask_ext.training import FINETUNE_NOISE, confidence_centre, masked_neg_entropy, scale_gradient
from softmask_ext.training.presets import gate_centre

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the shared results harness
import harness


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="a Dream checkpoint directory")
    p.add_argument(
        "--centres",
        type=gate_centre,
        nargs="+",
        default=[-0.75, "auto"],
        help="gate centres to measure: numbers < 0, or auto (the median pass-1 confidence)",
    )
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-chars", type=int, default=None, help="cap on the corpus (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    model = load_model(args.model, dtype=torch.float32)
    tokenizer = load_tokenizer(args.model)
    data = stdlib_dataset(tokenizer, "train", args.seq_len, args.max_chars)
    common = dict(
        mask_token_id=model.config.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        noise=FINETUNE_NOISE,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    results = []
    for centre in args.centres:
        value = confidence_centre(masked_neg_entropy(model, data, **common)) if centre == "auto" else centre
        grads, accuracy = scale_gradient(
            model, SoftMask(k=args.k, scale=0.0, centre=value), data, batches=args.batches, **common
        )
        row = {
            "model": str(args.model),
            "centre": centre,
            "centre_value": value,
            "k": args.k,
            "batches": args.batches,
            "dL_dscale_mean": float(grads.mean()),
            "dL_dscale_stderr": float(grads.std() / math.sqrt(len(grads))) if len(grads) > 1 else float("nan"),
            "share_negative": float((grads < 0).double().mean()),
            "pass1_top1_accuracy": float(accuracy.mean()),
        }
        results.append(row)
        print(
            f"centre {centre} ({value:.3f}): dL/dscale at scale 1e-6 = {row['dL_dscale_mean']:+.5f} "
            f"+- {row['dL_dscale_stderr']:.5f} (standard error over {args.batches} batches), negative in "
            f"{row['share_negative']:.0%} of the batches; pass-1 top-1 accuracy {row['pass1_top1_accuracy']:.3f}"
        )
    if args.out is not None:
        harness.write_results(args.out, {"rows": results})
    return results


if __name__ == "__main__":
    main()
