"""The engine's properties: capturable steps, logits only for generated rows, sampling primitives, CUDA graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from hypothesis import given, settings
from hypothesis import strategies as st
from test_decoding import SOFT_MASKS, infill_prompts, padded_batch, prompts, tiny_model

from softmask_ext import SoftMask
from softmask_ext.decoding import DecodeOptions, DiffusionDecoder, check_prompt, diffusion_generate, sampling
from softmask_ext.decoding.sampling import StepNoise, filter_logits, propose, select_transfers
from softmask_ext.decoding.schedule import step_ratios


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def decoder_for(model, ids, mask=None, soft_mask=None, generator=None, cuda_graph=None, **kw):
    options = DecodeOptions(mask_token_id=model.config.mask_token_id, **kw)
    prompt = check_prompt(
        ids, mask, options, vocab_size=model.config.vocab_size, max_positions=None, device=model.device
    )
    decoder = DiffusionDecoder(
        model,
        options,
        batch=prompt.batch,
        prompt_len=prompt.length,
        padded=prompt.attention_mask is not None,
        decode_from=prompt.first_mask,
        soft_mask=soft_mask,
        generator=generator,
        cuda_graph=cuda_graph,
    )
    return decoder, prompt


CASES = [
    dict(alg="entropy", soft_mask=None),
    dict(alg="maskgit_plus", soft_mask=SoftMask.from_any(SOFT_MASKS[1]), temperature=0.7, top_p=0.9, top_k=20),
    dict(alg="topk_margin", soft_mask=SoftMask.from_any(SOFT_MASKS[0]), alg_temp=0.3),
    dict(alg="origin", soft_mask=SoftMask.from_any(SOFT_MASKS[2]), temperature=1.0),
]


@pytest.mark.parametrize("infill", [False, True], ids=["new-tokens", "prompt-masks"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["alg"])
def test_step_compiles_without_graph_breaks(model, case, infill):
    """The step must trace whole: any host sync or data-dependent shape would break a CUDA graph capture."""
    torch._dynamo.reset()  # every case compiles DiffusionDecoder.step anew: keep its recompile count per test
    ids, mask = infill_prompts() if infill else padded_batch()
    kw = dict(max_new_tokens=0 if infill else 6, steps=3, **case)
    eager, prompt = decoder_for(model, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    compiled, _ = decoder_for(model, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    step = torch.compile(compiled.step, fullgraph=True, backend="eager")
    for decoder, run_step in ((eager, eager.step), (compiled, step)):
        decoder.load(prompt)
        for _ in range(3):
            decoder.noise.draw()
            run_step()
    assert torch.equal(eager.canvas, compiled.canvas)
    assert int(compiled.block_step) == 3
    if case["soft_mask"] is not None:
        assert torch.equal(eager.embeds, compiled.embeds)


def test_logits_only_for_generated_rows(model):
    """The LM head sees exactly the hidden rows P-1 .. P+N-2 (they predict the N generated positions)."""
    seen = []
    handle = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    hidden = []
    handle_h = model.model.register_forward_hook(lambda mod, args, out: hidden.append(out.detach().clone()))
    try:
        ids = prompts(2, 5)
        diffusion_generate(model, ids, max_new_tokens=7, steps=3, alg="entropy")
    finally:
        handle.remove()
        handle_h.remove()
    assert len(seen) == 3
    for rows, h in zip(seen, hidden):
        assert rows.shape == (2, 7, 32)
        assert torch.equal(rows, h[:, 4:11])


def test_decoder_is_reusable(model):
    decoder, prompt = decoder_for(model, prompts(), max_new_tokens=8, steps=4, alg="maskgit_plus")
    first, _ = decoder.run(prompt)
    second, _ = decoder.run(prompt)
    assert torch.equal(first, second)
    assert torch.equal(first, diffusion_generate(model, prompts(), max_new_tokens=8, steps=4, alg="maskgit_plus"))
    _, other = decoder_for(model, prompts(3), max_new_tokens=8, steps=4, alg="maskgit_plus")
    with pytest.raises(ValueError, match="another batch size"):
        decoder.run(other)


def test_cuda_graph_needs_cuda(model):
    if model.device.type == "cuda":
        pytest.skip("model on CUDA")
    with pytest.raises(ValueError, match="CUDA"):
        diffusion_generate(model, prompts(), max_new_tokens=4, steps=2, cuda_graph=True)


# ---------------------------------------------------------------------------------------------- schedule


def test_step_ratios_follow_dream_timesteps():
    ratios = step_ratios(5, 1e-3)
    ts = torch.linspace(1, 1e-3, 6)
    assert ratios.dtype == torch.float32 and ratios.shape == (5,)
    for i in range(4):
        assert ratios[i] == 1 - ts[i + 1] / ts[i]
    assert ratios[-1] == 1


@pytest.mark.parametrize("length,steps", [(12, 5), (7, 7), (30, 4), (1, 1)])
def test_each_step_unmasks_dreams_count(model, length, steps):
    mask_id = model.config.mask_token_id

    def never_predict_mask(step, x, logits):
        return logits.index_fill(-1, torch.tensor([mask_id]), float("-inf"))

    out = diffusion_generate(
        model,
        prompts(1),
        max_new_tokens=length,
        steps=steps,
        alg="entropy",
        generation_logits_hook_func=never_predict_mask,
        return_dict_in_generate=True,
        output_history=True,
    )
    ts = torch.linspace(1, 1e-3, steps + 1)
    left = length
    for i, canvas in enumerate(out.history):
        k = int(torch.tensor(float(left)) * (1 - ts[i + 1] / ts[i])) if i < steps - 1 else left
        left -= k
        assert int((canvas == mask_id).sum()) == left


# ---------------------------------------------------------------------------------------------- sampling


def test_filters_follow_dream():
    logits = torch.tensor([[2.0, 0.5, 1.0, -0.5]])
    # probs ~ [.60, .13, .22, .05]: tokens 0 and 2 reach 0.82 > 0.8, so top-p 0.8 keeps those two; 0.85 needs 1 too
    z = filter_logits(logits, 0.0, 0.8, None)
    assert (z > -1e30).tolist() == [[True, False, True, False]]
    assert (z == torch.finfo(torch.float32).min).sum() == 2
    z = filter_logits(logits, 0.0, 0.85, None)
    assert (z > -1e30).tolist() == [[True, True, True, False]]
    z = filter_logits(logits, 0.0, None, 2)
    assert (z > -1e30).tolist() == [[True, False, True, False]]
    z = filter_logits(logits, 0.5, None, None)
    assert torch.allclose(z, logits / 0.5)


def test_top_p_keeps_ties_with_the_last_kept_token():
    # probs ~ [.47, .17, .17, .17, .02]: token 0 alone is below 0.5, and tokens 1-3 tie, so all of them stay
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, -1.5]])
    assert (filter_logits(logits, 0.0, 0.5, None) > -1e30).tolist() == [[True, True, True, True, False]]


@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_top_p_shares_are_exact_for_large_logits(offset):
    # At temperature 0.1 the first token holds 0.9999546 of the mass (fp64), below 0.99996: the second one stays.
    logits = torch.tensor([[30.0, 29.0] + [0.0] * 100]) + offset
    assert (filter_logits(logits, 0.1, 0.99996, None) > -1e30).sum() == 2


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    vocab=st.sampled_from([sampling.TOP_P_CANDIDATES + 1, 300, 5000]),
    spread=st.sampled_from([0.1, 1.0, 5.0, 30.0]),
    top_p=st.floats(0.05, 0.999),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_top_p_candidates_match_a_full_sort(rows, vocab, spread, top_p, ties, seed):
    """The CPU's candidate search (with the sort only for the rows whose nucleus is wider) keeps exactly the tokens
    that sorting every row keeps; flat rows (small spread) exercise the fallback, peaked ones the candidates."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * spread
    if ties:
        logits = logits.round()  # many equal logits, also across the nucleus boundary
    logits[:, ::7] = float("-inf")
    logits[:, 1] = logits[:, 1].clamp_min(0.0)  # no row without a finite logit
    z = sampling._top_p_filter(logits, top_p)
    floor, _ = sampling._nucleus_floor(
        torch.sort(logits, dim=-1, descending=True).values, _softmax_total(logits), top_p
    )
    assert torch.equal(z > torch.finfo(torch.float32).min, logits >= floor)


def _softmax_total(logits):
    return (logits - logits.amax(-1, keepdim=True)).exp().sum(-1, keepdim=True)


def test_top_p_uses_both_paths():
    """Guards the test above: at these spreads some rows are decided by the candidates and some are not."""
    logits = torch.randn(2, 5000, generator=torch.Generator().manual_seed(0)) * torch.tensor([[30.0], [0.1]])
    descending = torch.topk(logits, sampling.TOP_P_CANDIDATES, dim=-1).values
    _, decided = sampling._nucleus_floor(descending, _softmax_total(logits), 0.9)
    assert decided.squeeze(-1).tolist() == [True, False]


@settings(max_examples=30, deadline=None)
@given(
    offset=st.sampled_from([0.0, 30.0, 300.0]),
    temperature=st.sampled_from([0.1, 1.0]),
    top_p=st.floats(0.5, 0.99),
    seed=st.integers(0, 2**16),
)
def test_top_p_matches_the_nucleus_computed_in_fp64(offset, temperature, top_p, seed):
    """Dream's rule with the probabilities in fp64, for logits of any magnitude (shares relative to the row's
    maximum; through logsumexp, large logits would shift every share by its rounding). Rows whose cumulative
    probability on either side of the cut comes within 2e-6 of top_p are left out: fp32 cannot place that cut."""
    logits = torch.randn(16, 3000, generator=torch.Generator().manual_seed(seed)) * 4 + offset
    logits[0, :2] = torch.tensor([offset + 30.0, offset + 29.0])  # a row with almost all mass on one token
    kept = filter_logits(logits, temperature, top_p, None) > torch.finfo(torch.float32).min
    z = logits / temperature
    descending = z.sort(-1, descending=True).values
    mass = torch.softmax(descending.double(), -1)
    above = torch.cumsum(mass, -1) - mass
    count = (above <= top_p).sum(-1, keepdim=True)
    floor = descending.gather(-1, count - 1)
    last_kept, first_dropped = above.gather(-1, count - 1), F.pad(above, (0, 1), value=2.0).gather(-1, count)
    clear = ((top_p - last_kept > 2e-6) & (first_dropped - top_p > 2e-6)).squeeze(-1)
    assert clear.sum() >= 2
    assert torch.equal(kept[clear], (z >= floor)[clear])


def test_inverse_cdf_samples_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.0, 0.15, 0.05])
    n = 20000
    uniform = torch.empty(n, dtype=torch.float64).uniform_(generator=torch.Generator().manual_seed(0))
    tokens, conf = propose(
        probs.log().expand(n, 5), alg="maskgit_plus", temperature=1.0, top_p=None, top_k=None, token_noise=uniform
    )
    freq = torch.bincount(tokens, minlength=5).float() / n
    assert freq[2] == 0
    assert torch.allclose(freq, probs, atol=0.015)
    assert torch.allclose(conf, probs[tokens], atol=1e-6)


def test_inverse_cdf_resolves_tiny_probabilities():
    """Every token owns exactly its share of [0, total): at both ends of each interval of a 1e-9 token after a token
    of mass 1, and never a token of probability 0 (an fp32 running sum would have swallowed the 1e-9 tokens)."""
    probs = torch.full((150_000,), 1e-9)
    probs[0] = 1.0
    probs[1::2] = 0.0
    cdf = probs.double().cumsum(0)
    total = float(cdf[-1])
    for j in (2, 1000, 99_998, 149_998):
        for inside in (cdf[j - 1] + 1e-13, cdf[j] - 1e-13):
            u = torch.tensor([float(inside) / total], dtype=torch.float64)
            assert sampling._inverse_cdf(probs[None], u).item() == j
    # 200 uniforms over [0, 1) in chunks: the fp64 cumulative sums of 150k-wide rows stay under ~50 MB a chunk.
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)[:-1]
    for chunk in grid.split(20):
        drawn = sampling._inverse_cdf(probs.expand(chunk.numel(), -1), chunk)
        assert (probs[drawn] > 0).all()


def test_confidences():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    for alg, expected in [
        ("maskgit_plus", 0.6),
        ("topk_margin", 0.3),
        (
            "entropy",
            0.6 * torch.log(torch.tensor(0.6))
            + 0.3 * torch.log(torch.tensor(0.3))
            + 0.1 * torch.log(torch.tensor(0.1)),
        ),
    ]:
        tokens, conf = propose(logits, alg=alg, temperature=0.0, top_p=None, top_k=None, token_noise=None)
        assert tokens.tolist() == [0]
        assert torch.allclose(conf, torch.tensor([float(expected)]), atol=1e-6)
    assert propose(logits, alg="origin", temperature=0.0, top_p=None, top_k=None, token_noise=None)[1] is None


def test_selection_counts_ranks_and_ties():
    masked = torch.tensor([[True, True, True, False, True], [True, False, True, True, True]])
    conf = torch.tensor([[0.1, 0.9, 0.5, 2.0, 0.5], [0.3, 9.0, 0.3, 0.3, 0.2]])
    # four masks per row, ratio 0.5 -> two per row; the unmasked 2.0 / 9.0 never count; ties go left
    out = select_transfers(
        masked, alg="maskgit_plus", confidence=conf, ratio=torch.tensor([0.5]), alg_temp=None, select_noise=None
    )
    assert out.tolist() == [[False, True, True, False, False], [True, False, True, False, False]]


def test_gumbel_top_k_follows_softmax_of_confidence():
    masked = torch.ones(1, 3, dtype=torch.bool).expand(20000, 3)
    conf = torch.log(torch.tensor([0.6, 0.3, 0.1])).expand(20000, 3)
    gen = torch.Generator().manual_seed(0)
    gumbel = -torch.empty(20000, 3).exponential_(generator=gen).log()
    out = select_transfers(
        masked, alg="entropy", confidence=conf, ratio=torch.tensor([0.34]), alg_temp=1.0, select_noise=gumbel
    )
    assert (out.sum(-1) == 1).all()
    assert torch.allclose(out.float().mean(0), torch.tensor([0.6, 0.3, 0.1]), atol=0.015)


def test_noise_buffers_only_when_needed():
    kw = dict(device=torch.device("cpu"), generator=None)
    assert StepNoise((2, 3), alg="entropy", temperature=0.0, alg_temp=None, **kw).token is None
    noise = StepNoise((2, 3), alg="origin", temperature=0.5, alg_temp=None, **kw)
    noise.draw()
    assert noise.token.shape == (2, 3) and noise.token.dtype == torch.float64
    assert ((noise.token >= 0) & (noise.token < 1)).all()
    assert ((noise.select >= 0) & (noise.select < 1)).all()


# ---------------------------------------------------------------------------------------------- CUDA


@requires_cuda
@pytest.mark.cuda
# A failed capture falls back to eager decoding with this warning, and the outputs would still match: it must fail.
@pytest.mark.filterwarnings("error:CUDA graph capture failed:RuntimeWarning")
@pytest.mark.parametrize("infill", [False, True], ids=["new-tokens", "prompt-masks"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["alg"])
def test_cuda_graph_matches_eager(case, infill):
    model = tiny_model().cuda()
    ids, mask = infill_prompts() if infill else padded_batch()
    sm = case["soft_mask"]
    kw = dict(case, soft_mask=None if sm is None else SoftMask.from_any(sm.to_transparency_config()).cuda())
    new_tokens = 0 if infill else 9
    outs = [
        diffusion_generate(
            model, ids.cuda(), mask.cuda(), max_new_tokens=new_tokens, steps=4, seed=0, cuda_graph=graph, **kw
        )
        for graph in (False, True)
    ]
    assert torch.equal(outs[0], outs[1])


@requires_cuda
@pytest.mark.cuda
def test_cuda_step_never_syncs():
    model = tiny_model().cuda()
    decoder, prompt = decoder_for(
        model,
        prompts().cuda(),
        soft_mask=SoftMask.from_any(SOFT_MASKS[1]).cuda(),
        max_new_tokens=8,
        steps=4,
        alg="entropy",
        temperature=0.5,
        top_p=0.9,
        cuda_graph=False,
    )
    decoder.run(prompt)  # warm-up: lazy initialisation may sync once
    decoder.load(prompt)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            decoder.noise.draw()
            decoder.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
@pytest.mark.cuda
def test_cuda_graph_is_captured_once_and_replayed_across_runs():
    model = tiny_model().cuda()
    sm = SoftMask.from_any(SOFT_MASKS[0]).cuda()
    kw = dict(max_new_tokens=9, steps=4, alg="entropy", soft_mask=sm)
    eager = diffusion_generate(model, prompts().cuda(), cuda_graph=False, **kw)
    decoder, prompt = decoder_for(model, prompts().cuda(), cuda_graph=True, **kw)
    first, _ = decoder.run(prompt)
    graphs = dict(decoder._graphs)
    second, history = decoder.run(prompt, output_history=True)
    assert list(graphs) == [("full", 0)] and graphs[("full", 0)] and decoder._graphs == graphs
    assert torch.equal(first, eager) and torch.equal(second, eager) and len(history) == 4
