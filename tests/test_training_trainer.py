"""The trainer: SM share, logged parameters, run directory, exact resumption."""

from __future__ import annotations

import json

import pytest
import torch
from _training_helpers import random_examples, tiny_model
from safetensors.torch import load_file

from softmask_ext import SoftMask
from softmask_ext.training import AdapterConfig, NoiseSchedule, TrainConfig, Trainer, latest_checkpoint

DATA = random_examples(48)
VAL = random_examples(8, seed=1)


def _config(run_dir, **overrides) -> TrainConfig:
    fields = dict(
        run_dir=str(run_dir),
        max_steps=6,
        batch_size=4,
        grad_accum=2,
        lr=3e-3,
        sm_lr=0.1,
        sm_prob=0.5,
        seed=3,
        eval_every=3,
    )
    return TrainConfig(**{**fields, **overrides})


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _trainer(run_dir, soft_mask=None, **overrides) -> Trainer:
    return Trainer(
        tiny_model(),
        DATA,
        _config(run_dir, **overrides),
        val_data=VAL,
        soft_mask=soft_mask or SoftMask(k=1, scale=0.3, centre=-6.0, steepness=1.0),
        device="cpu",
    )


@pytest.mark.parametrize("sm_prob", [0.0, 1.0])
def test_sm_probability_extremes(tmp_path, sm_prob):
    trainer = _trainer(tmp_path, sm_prob=sm_prob, max_steps=2, eval_every=0)
    before = trainer.soft_mask.raw_scale.detach().clone()
    trainer.train()
    records = _metrics(tmp_path)
    assert [r["sm_share"] for r in records] == [sm_prob, sm_prob]
    moved = not torch.equal(before, trainer.soft_mask.raw_scale.detach())
    assert moved == (sm_prob > 0), "SM parameters must train exactly when SM batches happen"


def test_each_step_draws_its_own_sm_coins(tmp_path):
    """Steps taken one by one (as the training benchmark does) advance ``step`` like ``train()``: fresh coins, so a
    run at sm_prob 0.5 mixes binary and SM micro-batches."""
    trainer = _trainer(tmp_path, eval_every=0, grad_accum=1)
    soft = [trainer.train_step()["sm_batches"] for _ in range(12)]
    assert trainer.step == 12
    assert 0 < sum(soft) < 12


def test_run_directory_metrics_and_transparency_config(tmp_path):
    trainer = _trainer(tmp_path)
    summary = trainer.train()
    records = _metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "grad_norm", "sm_share", "scale", "steepness", "centre"} <= r.keys() for r in records)
    assert {"val_binary", "val_soft_mask"} <= records[2].keys() and "val_binary" not in records[1]
    assert 0 < records[-1]["sm_share"] < 1
    assert records[-1]["scale"] != pytest.approx(0.3, abs=1e-4), "the learned scale should have moved"
    for path in ("transparency_config.json", "final/transparency_config.json"):
        loaded = SoftMask.from_transparency_config(tmp_path / path)
        assert loaded.to_transparency_config() == trainer.soft_mask.to_transparency_config()
        for name in ("scale", "steepness", "centre"):
            torch.testing.assert_close(getattr(loaded, name), getattr(trainer.soft_mask, name), rtol=1e-5, atol=1e-7)
    assert (tmp_path / "training.png").stat().st_size > 10_000
    assert (tmp_path / "final" / "model.safetensors").exists()
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["val_soft_mask"] == summary["val_soft_mask"] and saved["environment"]["torch"] == torch.__version__


def test_validation_is_paired_and_sm_changes_it(tmp_path):
    trainer = _trainer(tmp_path)
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first == second, "validation noise must be fixed"
    assert first["val_binary"] != first["val_soft_mask"]


def _resume_case(tmp_path, adapter: AdapterConfig, stop: int) -> None:
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    a = _trainer(straight, adapter=adapter, save_every=2)
    a.train()
    b = _trainer(interrupted, adapter=adapter, save_every=2)
    b.train(stop_at_step=stop)
    assert latest_checkpoint(interrupted / "checkpoints").name == f"step-{stop:08d}"
    # A fresh process: new model and trainer objects, state only from the checkpoint.
    c = _trainer(interrupted, adapter=adapter, save_every=2)
    assert c.resume() and c.step == stop
    c.train()
    assert [r["loss"] for r in _metrics(straight)] == [r["loss"] for r in _metrics(interrupted)]
    vals = [[r.get("val_soft_mask") for r in _metrics(run)] for run in (straight, interrupted)]
    assert vals[0] == vals[1]
    for name, p in a.model.state_dict().items():
        assert torch.equal(p, c.model.state_dict()[name]), name
    assert torch.equal(a.soft_mask.raw_scale, c.soft_mask.raw_scale)


def test_resume_continues_exactly_full_finetuning(tmp_path):
    _resume_case(tmp_path, AdapterConfig(kind="full"), stop=3)


def test_resume_continues_exactly_with_lora_adapters(tmp_path):
    _resume_case(tmp_path, AdapterConfig(kind="lora", rank=4, alpha=8.0, dropout=0.1), stop=4)
    ckpt = latest_checkpoint(tmp_path / "interrupted" / "checkpoints")
    assert (ckpt / "model" / "adapter_config.json").exists()
    assert all("lora_" in k for k in load_file(str(ckpt / "model" / "adapter_model.safetensors")))


def test_resume_refuses_a_different_configuration(tmp_path):
    _trainer(tmp_path, max_steps=2).train()
    with pytest.raises(ValueError, match="grad_accum=2, this run has grad_accum=1"):
        _trainer(tmp_path, max_steps=2, grad_accum=1).resume()


def test_bad_configuration_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="0 <= sm_prob <= 1"):
        _config(tmp_path, sm_prob=1.5)
    with pytest.raises(ValueError, match="fewer than one batch"):
        Trainer(tiny_model(), DATA[:3], _config(tmp_path), device="cpu")


def test_pretraining_noise_range_reduces_loss(tmp_path):
    """Binary MDLM training from scratch (pretrain's setting) learns a fixed pattern: the loss must fall."""
    pattern = [random_examples(1, seed=9, min_len=16)[0]] * 32
    config = _config(
        tmp_path,
        max_steps=30,
        sm_prob=0.0,
        noise=NoiseSchedule(1e-3, 1.0),
        lr=1e-2,
        grad_accum=1,
        eval_every=0,
        warmup_ratio=0.0,
    )
    trainer = Trainer(tiny_model(), pattern, config, val_data=pattern[:4], device="cpu")
    before = trainer.evaluate()
    assert set(before) == {"val_binary"}, "a binary run has no SM validation"
    after = trainer.train()
    assert after["val_binary"] < 0.5 * before["val_binary"]


def test_gradient_checkpointing_does_not_change_training(tmp_path):
    plain = _trainer(tmp_path / "plain", max_steps=2, eval_every=0)
    plain.train()
    checkpointed = _trainer(tmp_path / "ckpt", max_steps=2, eval_every=0, gradient_checkpointing=True)
    assert checkpointed.model.is_gradient_checkpointing
    checkpointed.train()
    for a, b in zip(_metrics(tmp_path / "plain"), _metrics(tmp_path / "ckpt")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_dora_checkpointed_sm_training(tmp_path):
    """The paper's recipe on a GPU: bf16 base, DoRA, gradient checkpointing, bf16 autocast, SM on every batch."""
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = tiny_model()
    finally:
        torch.set_default_dtype(torch.float32)
    config = _config(
        tmp_path,
        max_steps=4,
        sm_prob=1.0,
        bf16=True,
        gradient_checkpointing=True,
        adapter=AdapterConfig(kind="dora", rank=4, alpha=8.0),
        eval_every=2,
    )
    trainer = Trainer(
        model, DATA, config, val_data=VAL, device="cuda", soft_mask=SoftMask(k=1, scale=0.3, centre=-6.0, steepness=1.0)
    )
    before = trainer.soft_mask.raw_scale.detach().clone()
    summary = trainer.train()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _metrics(tmp_path))
    assert not torch.equal(before, trainer.soft_mask.raw_scale.detach())
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()
    assert summary["val_binary"] > 0 and summary["val_soft_mask"] > 0
