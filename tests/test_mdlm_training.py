"""MDLM training and metrics: the antithetic sampler, the loss against a transcription of the authors' objective, the
SM two-pass gradients, EMA save/resume exactness, trainer resumption, ELBO perplexity, generative perplexity, and
two DDP processes equal to one (FSDP: tests/test_mdlm_fsdp.py)."""

from __future__ import annotations

import json
import shutil

import _mdlm_worker as worker
import pytest
import torch
from _training_helpers import TINY_MDLM, text_blocks, tiny_mdlm
from hypothesis import given
from hypothesis import strategies as st

from softmask_ext.diffusion.mdlm_objective import antithetic_times, mask_tokens, mdlm_loss
from softmask_ext.diffusion.two_pass import DiffusionTrainingForward
from softmask_ext.evaluation.mdlm_metrics import (
    MAUVE_MISSING,
    elbo_perplexity,
    generative_perplexity,
    mauve_score,
)
from softmask_ext.model.mdlm import MDLMModel
from softmask_ext.soft_mask import SoftMask
from softmask_ext.training.ema import EMA
from softmask_ext.training.mdlm_trainer import MDLM_PRESETS, MDLMTrainer, mdlm_preset


@given(n=st.integers(1, 64), seed=st.integers(0, 2**31 - 1))
def test_antithetic_times_cover_one_stratum_each(n, seed):
    t = antithetic_times(n, torch.Generator().manual_seed(seed))
    u = (t - 1e-3) / (1 - 1e-3)
    strata = torch.floor(u * n + 1e-4).clamp(max=n - 1)
    assert torch.equal(strata, torch.arange(n, dtype=strata.dtype)) or n > 32  # fp32 rounding at stratum edges
    assert bool((t >= 1e-3).all()) and bool((t <= 1).all())


def test_loss_matches_authors_objective():
    model = tiny_mdlm().eval()
    x0 = torch.randint(0, 29, (3, 16))
    t = torch.tensor([0.2, 0.5, 0.9])
    x_t = mask_tokens(x0, t, TINY_MDLM.mask_token_id, torch.Generator().manual_seed(1))
    total = mdlm_loss(model(input_ids=x_t).logits, x0, t, x_t, TINY_MDLM.mask_token_id, 0)
    # authors: SUBS log-probs over all positions, log p(x0) * dalpha / (1 - alpha), summed over valid tokens
    logits = model(input_ids=x_t).logits.float()
    logits = logits - torch.logsumexp(logits, -1, keepdim=True)
    unmasked = x_t != TINY_MDLM.mask_token_id
    logits[unmasked] = -1e6
    logits[unmasked, x_t[unmasked]] = 0
    log_p = logits.gather(-1, x0[..., None]).squeeze(-1)
    alpha = 1 - (1 - 1e-3) * t[:, None]
    expected = (log_p * -(1 - 1e-3) / (1 - alpha)).sum()
    torch.testing.assert_close(total, expected)


def test_no_forced_mask_and_mask_rate():
    x0 = torch.randint(0, 29, (400, 16))
    x_t = mask_tokens(x0, torch.full((400,), 0.25), TINY_MDLM.mask_token_id, torch.Generator().manual_seed(0))
    rate = (x_t == TINY_MDLM.mask_token_id).float().mean()
    assert abs(float(rate) - 0.25 * (1 - 1e-3)) < 0.01
    x_t = mask_tokens(x0, torch.full((400,), 1e-3), TINY_MDLM.mask_token_id, torch.Generator().manual_seed(0))
    assert (x_t == TINY_MDLM.mask_token_id).sum(1).eq(0).any()  # rows without a mask stay so


def test_sm_two_pass_reaches_weights_table_and_sm_parameters():
    model, soft_mask = tiny_mdlm(), SoftMask(k=3, scale=0.5)
    x0 = torch.randint(0, 29, (2, 16))
    t = torch.tensor([0.5, 0.7])
    x_t = mask_tokens(x0, t, TINY_MDLM.mask_token_id, torch.Generator().manual_seed(3))
    logits = DiffusionTrainingForward(model, soft_mask, TINY_MDLM.mask_token_id)(x_t, None, True)
    mdlm_loss(logits, x0, t, x_t, TINY_MDLM.mask_token_id, 0).backward()
    assert soft_mask.raw_scale.grad is not None and soft_mask.raw_scale.grad != 0
    assert model.backbone.vocab_embed.embedding.grad.abs().sum() > 0


def test_ema_state_resumes_exactly():
    model = tiny_mdlm()
    ema = EMA(model, 0.999)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ema.update(model)
    clone = EMA(tiny_mdlm(), 0.5)
    clone.load_state_dict({k: v.clone() for k, v in ema.state_dict().items()})
    assert clone.num_updates == 3 and clone.decay == 0.999
    for name in ema.shadow:
        assert torch.equal(clone.shadow[name], ema.shadow[name])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.averaged(model):
        assert torch.equal(model.backbone.blocks[0].attn_qkv.weight, ema.shadow["backbone.blocks.0.attn_qkv.weight"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert ema.current_decay() == min(0.999, 5 / 14)  # MDLM's warm-up of the decay


def test_preset_is_the_authors_recipe():
    config = mdlm_preset("mdlm-sm-paper", run_dir="x", max_steps=1)
    assert (
        config.lr,
        config.sm_lr,
        config.sm_prob,
        config.sm_k,
        config.clip,
        config.ema,
        config.warmup_steps,
        config.weight_decay,
    ) == (3e-4, 1e-2, 0.8, 3, 1.0, 0.9999, 2500, 0.0)
    assert MDLM_PRESETS["mdlm-pretrain"]["sm_prob"] == 0.0
    with pytest.raises(ValueError, match="unknown MDLM preset"):
        mdlm_preset("dream-paper", run_dir="x", max_steps=1)


def test_trainer_resumes_exactly(tmp_path):
    train, val = text_blocks(24), text_blocks(8, seed=1)
    kwargs = dict(
        max_steps=4, batch_size=4, grad_accum=2, warmup_steps=2, sm_prob=0.5, ema=0.9, lr=1e-3, eval_batches=1
    )
    straight = MDLMTrainer(tiny_mdlm(), mdlm_preset("mdlm-sm-paper", run_dir=str(tmp_path / "a"), **kwargs), train, val)
    straight.train()
    first = MDLMTrainer(tiny_mdlm(), mdlm_preset("mdlm-sm-paper", run_dir=str(tmp_path / "b"), **kwargs), train, val)
    for _ in range(2):
        first.train_step()
    first.save_checkpoint()
    resumed = MDLMTrainer(
        tiny_mdlm(seed=5), mdlm_preset("mdlm-sm-paper", run_dir=str(tmp_path / "b"), **kwargs), train, val
    )
    summary = resumed.train()
    assert resumed.step == 4 and summary["steps"] == 4
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    for name in straight.ema.shadow:
        assert torch.equal(straight.ema.shadow[name], resumed.ema.shadow[name])
    assert torch.equal(straight.soft_mask.raw_scale, resumed.soft_mask.raw_scale)
    assert (tmp_path / "b" / "final" / "transparency_config.json").exists()
    # the final model holds the EMA weights
    final = MDLMModel.from_pretrained(tmp_path / "b" / "final")
    assert torch.equal(
        final.backbone.blocks[1].attn_out.weight, resumed.ema.shadow["backbone.blocks.1.attn_out.weight"]
    )


def test_elbo_perplexity_is_paired_and_sm_changes_it():
    model, blocks = tiny_mdlm(), text_blocks(6)
    binary = elbo_perplexity(model, blocks, batch_size=3)
    again = elbo_perplexity(model, blocks, batch_size=3)
    soft = elbo_perplexity(model, blocks, soft_mask=SoftMask(k=3, scale=0.9, steepness=2.0, centre=-4.0), batch_size=3)
    assert binary == again and binary["tokens"] == 96
    assert soft["nll"] != binary["nll"] and binary["perplexity"] == pytest.approx(torch.tensor(binary["nll"]).exp())


@pytest.mark.slow  # loads transformers' GPT-2 classes (tens of seconds on a busy CI machine)
def test_generative_perplexity_with_a_local_scorer(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    assets = "softmask_ext/assets/tiny-coder"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(f"{assets}/{name}", tmp_path / name)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        tmp_path
    )
    result = generative_perplexity(["def f(x):\n    return x + 1\n", "import os\n"], tmp_path, max_length=64)
    assert result["tokens"] > 5 and 100 < result["perplexity"] < 2000  # an untrained scorer: about uniform over 512
    with pytest.raises(FileNotFoundError, match="scorer"):
        generative_perplexity(["x"], tmp_path / "missing")


def test_mauve_is_skipped_with_a_message_without_its_package():
    try:
        import mauve  # noqa: F401
    except ImportError:
        assert mauve_score(["a"], ["b"]) == {"skipped": MAUVE_MISSING}
    else:
        assert "skipped" in mauve_score(["a"], ["b"], feature_model=None)


@pytest.mark.slow  # two torchrun processes
def test_two_processes_match_one(tmp_path):
    worker.launch("ddp", tmp_path)
    worker.trainer(tmp_path / "one", grad_accum=2).train()
    ddp = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["sm_share"] for r in ddp] == [r["sm_share"] for r in one]
    for a, b in zip(ddp, one):
        assert abs(a["loss"] - b["loss"]) < 1e-5
    final = MDLMModel.from_pretrained(tmp_path / "ddp" / "final")
    for (name, p), q in zip(
        final.named_parameters(), MDLMModel.from_pretrained(tmp_path / "one" / "final").parameters()
    ):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
