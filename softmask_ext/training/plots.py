"""The training figure: loss curves, and the learned mixing weight lam as a function of the confidence."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ..soft_mask import SoftMask

__all__ = ["plot_training"]


def plot_training(records: Sequence[dict], soft_mask: SoftMask, vocab_size: int, path: str | Path) -> Path:
    """Write a PNG with (left) training and validation losses against the step and (right) lam(negH) of the
    current SM parameters next to the paper's initialisation, over negH in [-log V, 0]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_binary" in r]
    fig, (ax_loss, ax_lam) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.6, label="train")
    if evals:
        steps = [r["step"] for r in evals]
        ax_loss.plot(steps, [r["val_binary"] for r in evals], "o-", label="validation, binary masks")
        if "val_soft_mask" in evals[0]:
            ax_loss.plot(steps, [r["val_soft_mask"] for r in evals], "s-", label="validation, soft masks")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss (negative ELBO per token, nats)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)

    neg_h = torch.linspace(-math.log(vocab_size), 0.0, 200)
    initial = SoftMask(k=soft_mask.k, alg=soft_mask.alg)
    with torch.no_grad():
        learned = soft_mask.lam(neg_h.to(soft_mask.raw_scale.device)).cpu()  # the SM may live on the GPU
        ax_lam.plot(neg_h, learned, label="learned")
        ax_lam.plot(neg_h, initial.lam(neg_h), "--", label="initial (scale ~1e-6)")
    cfg = soft_mask.to_transparency_config()
    ax_lam.set_title(
        f"scale {cfg['transparency_scale']:.3g}, steepness {cfg['transparency_steepness']:.3g}, "
        f"centre {cfg['transparency_centre']:.3g}",
        fontsize=9,
    )
    ax_lam.set_xlabel("negative entropy of the previous prediction (nats)")
    ax_lam.set_ylabel("lam (share of the predicted embedding)")
    ax_lam.legend()
    ax_lam.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
