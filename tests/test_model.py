"""DreamModel forward: masks and padding, logits rows, dtypes, compile-ability, checkpointing, PEFT, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softmask_ext.model import DreamConfig, DreamModel

VOCAB, PAD, MASK = 512, 500, 511


def tiny_model(seed: int = 0, **overrides) -> DreamModel:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        mask_token_id=MASK,
        pad_token_id=PAD,
        eos_token_id=PAD,
        bos_token_id=501,
    )
    torch.manual_seed(seed)
    model = DreamModel(DreamConfig(**{**fields, **overrides}))
    model.reset_parameters(std=0.15)  # larger than pretraining init so attention is far from uniform
    return model.eval()


@pytest.fixture(scope="module")
def model() -> DreamModel:
    return tiny_model()


def left_pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s) :] = s
        mask[b, T - len(s) :] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------- outputs
@torch.no_grad()
def test_output_forms_and_shapes(model):
    ids = torch.randint(0, VOCAB, (3, 7))
    out = model(ids)
    (logits,) = out
    assert out.logits is out[0] is logits
    assert logits.shape == (3, 7, VOCAB) and logits.dtype == torch.float32


@torch.no_grad()
def test_attention_is_bidirectional(model):
    ids = torch.randint(0, VOCAB - 16, (1, 6))
    changed = ids.clone()
    changed[0, -1] += 1
    assert not torch.allclose(model(ids).logits[0, 0], model(changed).logits[0, 0], atol=1e-4)


@torch.no_grad()
def test_inputs_embeds_equal_input_ids(model):
    ids = torch.randint(0, VOCAB, (2, 9))
    torch.testing.assert_close(model(inputs_embeds=model.embed_tokens(ids)).logits, model(ids).logits, atol=0, rtol=0)
    assert model.get_input_embeddings() is model.embed_tokens is model.model.embed_tokens


@torch.no_grad()
def test_logits_rows_select_the_same_rows(model):
    ids = torch.randint(0, VOCAB, (2, 10))
    full = model(ids).logits
    rows = torch.tensor([[9, 3, 4], [0, 0, 7]])
    torch.testing.assert_close(
        model(ids, logits_rows=rows).logits, torch.stack([full[0, rows[0]], full[1, rows[1]]]), atol=1e-5, rtol=0
    )
    flat = torch.tensor([19, 2, 10])  # row b*T + t
    torch.testing.assert_close(model(ids, logits_rows=flat).logits, full.reshape(20, VOCAB)[flat], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- masks, padding
@settings(max_examples=15)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_left_padded_batch_matches_each_sequence_alone(model, lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, VOCAB - 16, (n,), generator=gen) for n in lengths]
    ids, mask = left_pad(seqs)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for b, s in enumerate(seqs):
            alone = model(s[None]).logits[0]
            torch.testing.assert_close(batched[b, ids.shape[1] - len(s) :], alone, atol=2e-5, rtol=0)


@torch.no_grad()
def test_mask_forms_agree(model):
    ids, mask = left_pad([torch.randint(0, VOCAB, (n,)) for n in (8, 5, 2)])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = mask.bool()
    want = model(ids, attention_mask=mask).logits
    for mask_4d in (
        keep[:, None, None, :],  # bool, True = may attend
        torch.zeros(3, 1, 8, 8).masked_fill(~keep[:, None, None, :], float("-inf")),
    ):  # additive
        got = model(ids, attention_mask=mask_4d, position_ids=positions).logits
        torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(model(ids, attention_mask=keep).logits, want, atol=0, rtol=0)
    torch.testing.assert_close(model(ids, attention_mask=mask, position_ids=positions).logits, want, atol=0, rtol=0)


@torch.no_grad()
def test_default_positions_are_arange(model):
    ids = torch.randint(0, VOCAB, (2, 6))
    want = model(ids).logits
    for positions in (torch.arange(6), torch.arange(6)[None], torch.arange(6).expand(2, 6)):
        torch.testing.assert_close(model(ids, position_ids=positions).logits, want, atol=0, rtol=0)
    # RoPE is relative: shifting every position leaves a bidirectional pass unchanged; a gap does not.
    torch.testing.assert_close(model(ids, position_ids=torch.arange(6) + 5).logits, want, atol=1e-4, rtol=0)
    gapped = model(ids, position_ids=torch.tensor([0, 1, 2, 10, 11, 12])).logits
    assert not torch.allclose(gapped, want, atol=1e-3)


# ---------------------------------------------------------------------------------------------- dtypes, devices
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_close_to_fp32(model, dtype):
    low = copy.deepcopy(model).to(dtype)
    assert low.dtype == dtype and all(p.dtype == dtype for p in low.parameters())
    ids, mask = left_pad([torch.randint(0, VOCAB, (n,)) for n in (9, 4)])
    with torch.no_grad():
        got = low(ids, attention_mask=mask).logits
        want = model(ids, attention_mask=mask).logits
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.float()[mask.bool()], want[mask.bool()], atol=0.1, rtol=0.05)


@torch.no_grad()
def test_to_rebuilds_rotary_tables(model):
    m = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (1, 5))
    want = m(ids).logits
    assert (torch.device("cpu"), torch.float32) in m.model.rotary_emb._tables
    m.to(torch.bfloat16).to(torch.float32)
    assert not m.model.rotary_emb._tables  # moved: tables rebuilt from fp32 on next use, not cast back from bf16
    torch.testing.assert_close(m(ids).logits, want, atol=0.05, rtol=0)
    assert m.device == torch.device("cpu") and m.dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_matches_cpu(model):
    gpu = copy.deepcopy(model).to("cuda", torch.bfloat16)
    ids, mask = left_pad([torch.randint(0, VOCAB, (n,)) for n in (9, 4)])
    with torch.no_grad():
        got = gpu(ids.cuda(), attention_mask=mask.cuda()).logits.float().cpu()
        got_nomask = gpu(ids[:1].cuda()).logits.float().cpu()
        want = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=0.1, rtol=0.05)
    torch.testing.assert_close(got_nomask[0], want[0], atol=0.1, rtol=0.05)


# ---------------------------------------------------------------------------------------------- capture safety
def test_compiles_fullgraph_without_host_syncs(model):
    """fullgraph=True fails on any graph break: .item(), data-dependent shapes, branching on tensor values."""
    m = copy.deepcopy(model)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    ids, mask = left_pad([torch.randint(0, VOCAB, (n,)) for n in (8, 3)])
    rows = torch.tensor([[5, 6, 7], [5, 6, 7]])
    with torch.no_grad():
        for kwargs in (
            dict(input_ids=ids),
            dict(input_ids=ids, attention_mask=mask, logits_rows=rows),
            dict(inputs_embeds=m.embed_tokens(ids), attention_mask=mask, logits_rows=rows.flatten()),
        ):
            torch.testing.assert_close(compiled(**kwargs).logits, m(**kwargs).logits, atol=1e-5, rtol=0)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- training
def _grads(m: DreamModel, ids, mask) -> dict[str, torch.Tensor]:
    m.zero_grad()
    logits = m(ids, attention_mask=mask).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(model, reentrant):
    m = copy.deepcopy(model).train()
    ids, mask = left_pad([torch.randint(0, VOCAB, (n,)) for n in (7, 4)])
    want = _grads(m, ids, mask)
    m.gradient_checkpointing_enable({"use_reentrant": reentrant})
    m.enable_input_require_grads()  # what PEFT/Trainer do; needed by the reentrant variant
    assert m.is_gradient_checkpointing
    got = _grads(m, ids, mask)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)
    m.gradient_checkpointing_disable()
    m.disable_input_require_grads()
    assert not m.is_gradient_checkpointing


def test_bf16_autocast_training_with_fp32_weights(model):
    m = copy.deepcopy(model).train()
    m.gradient_checkpointing_enable()
    ids, mask = left_pad([torch.randint(0, VOCAB, (n,)) for n in (8, 3)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(ids, attention_mask=mask).logits
    assert logits.dtype == torch.bfloat16
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten()).backward()
    grad = m.model.layers[0].self_attn.q_proj.weight.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_adapters_train_and_merge(model, use_dora):
    peft = pytest.importorskip("peft")
    base = copy.deepcopy(model)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        use_dora=use_dora,
        init_lora_weights=True,
    )
    wrapped = peft.get_peft_model(base, config)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("model.model.layers.1.self_attn.o_proj.lora_A" in n for n in trainable)  # HF Dream's adapter names

    wrapped.base_model.model.gradient_checkpointing_enable()
    wrapped.train()
    ids = torch.randint(0, VOCAB, (2, 8))
    optimiser = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(wrapped(input_ids=ids).logits.flatten(0, 1), ids.flatten())
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    wrapped.eval()
    with torch.no_grad():
        adapted = wrapped(input_ids=ids).logits
        merged = wrapped.merge_and_unload()
        assert isinstance(merged, DreamModel)
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(model(ids).logits, adapted, atol=1e-3)


def test_peft_adapter_save_and_reload(model, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False)
    wrapped = peft.get_peft_model(copy.deepcopy(model), config).eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        want = wrapped(input_ids=ids).logits
    wrapped.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(), ValueError, "exactly one of input_ids or inputs_embeds"),
        (
            dict(input_ids=torch.zeros(2, 3, dtype=torch.long), inputs_embeds=torch.zeros(2, 3, 64)),
            ValueError,
            "exactly one",
        ),
        (dict(input_ids=torch.zeros(3, dtype=torch.long)), ValueError, r"2-D \[batch, seq\]"),
        (dict(input_ids=torch.zeros(2, 3)), TypeError, "int64 or int32"),
        (dict(inputs_embeds=torch.zeros(2, 3, 32)), ValueError, r"\[batch, seq, 64\]"),
        (dict(inputs_embeds=torch.zeros(2, 3, 64, dtype=torch.float64)), TypeError, "model is torch.float32"),
        (
            dict(input_ids=torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4)),
            ValueError,
            r"attention_mask must be \[2, 3\]",
        ),
        (
            dict(input_ids=torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 1, 4, 4)),
            ValueError,
            "4-D attention_mask must broadcast",
        ),
        (dict(input_ids=torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 3, 3)), ValueError, "or 4-D"),
        (dict(input_ids=torch.zeros(2, 3, dtype=torch.long), attention_mask=[[1, 1, 1]] * 2), TypeError, "tensor"),
        (
            dict(input_ids=torch.zeros(2, 3, dtype=torch.long), position_ids=torch.zeros(2, 4, dtype=torch.long)),
            ValueError,
            "position_ids must be",
        ),
        (
            dict(input_ids=torch.zeros(2, 3, dtype=torch.long), position_ids=torch.zeros(2, 3)),
            TypeError,
            "position_ids must be an integer tensor",
        ),
        (
            dict(input_ids=torch.zeros(2, 3, dtype=torch.long), logits_rows=torch.zeros(3, 1, dtype=torch.long)),
            ValueError,
            r"logits_rows must be \[2, R\]",
        ),
        (
            dict(input_ids=torch.zeros(2, 3, dtype=torch.long), logits_rows=torch.zeros(2, 1)),
            TypeError,
            "logits_rows must be an integer tensor",
        ),
    ],
)
def test_bad_input_is_a_clear_error(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        model(**kwargs)


def test_bad_config_is_a_clear_error():
    with pytest.raises(TypeError, match="DreamConfig"):
        DreamModel({"hidden_size": 64})
    with pytest.raises(ValueError, match="head_dim must be even"):
        DreamConfig(
            hidden_size=60,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            mask_token_id=MASK,
            pad_token_id=0,
            eos_token_id=0,
            bos_token_id=0,
        )


# ---------------------------------------------------------------------------------------------- decoding hook-up
def test_diffusion_generate_delegates_to_the_engine(model):
    decoding = pytest.importorskip("softmask_ext.decoding")
    if not hasattr(decoding, "diffusion_generate"):
        pytest.skip("the decoding engine is not in place yet")
    prompt = torch.randint(0, VOCAB - 16, (1, 4))
    kwargs = dict(max_new_tokens=4, steps=2, temperature=0.0, alg="maskgit_plus")
    torch.testing.assert_close(
        model.diffusion_generate(prompt, **kwargs), decoding.diffusion_generate(model, prompt, **kwargs)
    )
