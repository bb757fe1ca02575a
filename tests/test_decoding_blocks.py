"""Block-wise decoding with K/V caches and threshold parallel decoding, token for token against transcriptions of
Fast-dLLM's loops (LLaDA's prefix/dual cache, Dream's block loop) and the engine's own block-wise Dream rule."""

from __future__ import annotations

import functools

import pytest
import torch
from _fastdllm_oracle import dream_blocks, llada_cached
from conftest import requires_cuda
from test_decoding import SOFT_MASKS, tiny_model
from test_decoding_llada import MODELS, prompts

from softmask_ext import SoftMask
from softmask_ext.decoding import (
    DecodeOptions,
    DiffusionDecoder,
    check_prompt,
    diffusion_generate,
)

CACHED = ["prefix", "dual"]


def SLOW(case):
    return pytest.param(case, marks=pytest.mark.slow)


@functools.cache
def model_named(name):
    return {"dream": tiny_model, **MODELS}[name]()


@pytest.fixture(scope="module", params=list(MODELS))
def llada(request):
    """LLaDA's conventions on Dream's blocks, and the real LLaDAModel."""
    return model_named(request.param)


@pytest.fixture(scope="module")
def dream():
    return model_named("dream")


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("cache", CACHED)
@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(threshold=0.3),
        SLOW(dict(temperature=0.7, remasking="random")),
        dict(threshold=0.2, temperature=0.5, soft_mask=SOFT_MASKS[0]),
        SLOW(dict(soft_mask=SOFT_MASKS[1])),
    ],
    ids=["greedy", "threshold", "random", "threshold-sm", "sm"],
)
def test_llada_caches_match_fast_dllm(llada, cache, case):
    case = dict(case)
    sm = case.pop("soft_mask", None)
    ours = diffusion_generate(
        llada,
        prompts(),
        max_new_tokens=12,
        steps=6,
        block_length=4,
        cache=cache,
        soft_mask=sm,
        generator=seeded(),
        **case,
    )
    theirs = llada_cached(
        llada,
        prompts(),
        steps=6,
        gen_length=12,
        block_length=4,
        mask_id=llada.config.mask_token_id,
        dual=cache == "dual",
        soft_mask=SoftMask.from_any(sm),
        generator=seeded(),
        **case,
    )
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("cache", CACHED)
@pytest.mark.parametrize(
    "case",
    [
        dict(alg="maskgit_plus"),
        SLOW(dict(threshold=0.3)),
        dict(temperature=0.7, top_p=0.9, alg_temp=0.5, soft_mask=SOFT_MASKS[0]),
        SLOW(dict(threshold=0.2, soft_mask=SOFT_MASKS[2])),
    ],
    ids=["fixed", "threshold", "sampled-sm", "threshold-sm"],
)
def test_dream_fast_dllm_compat_matches_its_loop(dream, cache, case):
    case = dict(case)
    sm = case.pop("soft_mask", None)
    ours = diffusion_generate(
        dream,
        prompts(),
        max_new_tokens=12,
        steps=6,
        block_length=4,
        cache=cache,
        fast_dllm_compat=True,
        soft_mask=sm,
        generator=seeded(),
        **case,
    )
    theirs = dream_blocks(
        dream,
        prompts(),
        steps=6,
        max_new_tokens=12,
        block_length=4,
        cache=cache,
        compat=True,
        soft_mask=SoftMask.from_any(sm),
        generator=seeded(),
        **case,
    )
    assert torch.equal(ours, theirs)


def test_compat_behaviours_show(dream):
    """Fast-dLLM's two behaviours change the tokens: the first position is committed by the refresh forward, and
    alg is overridden by negative entropy (so maskgit_plus and topk_margin give the same result)."""
    kw = dict(max_new_tokens=12, steps=6, block_length=4, cache="dual")
    compat = [
        diffusion_generate(dream, prompts(), alg=alg, fast_dllm_compat=True, **kw)
        for alg in ("maskgit_plus", "topk_margin")
    ]
    assert torch.equal(compat[0], compat[1])
    assert not torch.equal(compat[0], diffusion_generate(dream, prompts(), alg="maskgit_plus", **kw))


@pytest.mark.parametrize("cache", ["none", *CACHED])
@pytest.mark.parametrize(
    "case",
    [
        SLOW(dict(alg="topk_margin")),
        dict(alg="maskgit_plus", threshold=0.3),
        SLOW(dict(alg="origin", temperature=0.6)),
        dict(alg="maskgit_plus", temperature=0.7, alg_temp=0.5, soft_mask=SOFT_MASKS[1]),
        SLOW(dict(alg="maskgit_plus", threshold=0.2, soft_mask=SOFT_MASKS[3])),
    ],
    ids=["margin", "threshold", "origin", "sampled-sm", "threshold-sm"],
)
def test_dream_blocks_match_the_dense_oracle(dream, cache, case):
    case = dict(case)
    sm = case.pop("soft_mask", None)
    ours = diffusion_generate(
        dream,
        prompts(),
        max_new_tokens=12,
        steps=6,
        block_length=4,
        cache=cache,
        soft_mask=sm,
        generator=seeded(),
        **case,
    )
    theirs = dream_blocks(
        dream,
        prompts(),
        steps=6,
        max_new_tokens=12,
        block_length=4,
        cache=cache,
        compat=False,
        soft_mask=SoftMask.from_any(sm),
        generator=seeded(),
        **case,
    )
    assert torch.equal(ours, theirs)


def test_caches_approximate(llada):
    """The caches are an approximation: over enough blocks their tokens differ from the exact (uncached) ones."""
    kw = dict(max_new_tokens=16, steps=16, block_length=4)
    outs = [diffusion_generate(llada, prompts(4), cache=cache, **kw) for cache in ("none", "prefix", "dual")]
    assert not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("cache", CACHED)
@pytest.mark.parametrize("family", ["dream", *MODELS])
def test_batch_equals_single_prompts(family, cache):
    model = model_named(family)
    ids = prompts(3, 6, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kw = dict(max_new_tokens=8, steps=4, block_length=4, cache=cache, threshold=0.3, soft_mask=SOFT_MASKS[0])
    if family == "dream":
        kw["alg"] = "maskgit_plus"
    batched = diffusion_generate(model, ids, mask, **kw)
    for b in range(3):
        real = mask[b].bool()
        alone = diffusion_generate(model, ids[b : b + 1, real], **kw)
        assert torch.equal(batched[b, 6:], alone[0, int(real.sum()) :])


def test_window_forwards_run_only_the_window(llada):
    """prefix: the block and what follows; dual: the block alone (plus one full forward per block)."""
    lengths = []
    first_layer = llada.decoder_stack().layers_and_norm()[0][0]
    hook = first_layer.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    try:
        for cache in CACHED:
            lengths.clear()
            diffusion_generate(llada, prompts(1), max_new_tokens=12, steps=6, block_length=4, cache=cache)
            window = [12, 8, 4] if cache == "prefix" else [4, 4, 4]
            assert lengths == [length for w in window for length in (17, w)]
    finally:
        hook.remove()


@pytest.mark.parametrize(
    "kind,cache", [("fill", "prefix"), ("window", "dual"), pytest.param("window", "prefix", marks=pytest.mark.slow)]
)
def test_cached_steps_compile_without_graph_breaks(dream, cache, kind):
    torch._dynamo.reset()  # every case compiles DiffusionDecoder.step anew: keep its recompile count per test
    options = DecodeOptions(
        max_new_tokens=8,
        steps=4,
        mask_token_id=dream.config.mask_token_id,
        alg="maskgit_plus",
        block_length=4,
        cache=cache,
        threshold=0.5,
        temperature=0.5,
    )
    ids = prompts()
    prompt = check_prompt(ids, None, options, vocab_size=97, max_positions=None, device=torch.device("cpu"))
    decoders = [
        DiffusionDecoder(
            dream,
            options,
            batch=2,
            prompt_len=5,
            padded=False,
            generator=seeded(),
            soft_mask=SoftMask.from_any(SOFT_MASKS[0]),
        )
        for _ in range(2)
    ]
    step = torch.compile(decoders[1].step, fullgraph=True, backend="eager")
    for decoder, run_step in ((decoders[0], decoders[0].step), (decoders[1], step)):
        decoder.load(prompt)
        decoder.noise.draw()
        decoder.step("fill")
        if kind == "window":
            decoder.noise.draw()
            run_step("window")
        else:
            decoder.start_block(1)
            decoder.noise.draw()
            run_step("fill")
    assert torch.equal(decoders[0].canvas, decoders[1].canvas)
    assert torch.equal(decoders[0].embeds, decoders[1].embeds)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("cache", ["none", *CACHED])
def test_cuda_graphs_match_eager(cache):
    model = tiny_model().cuda()
    kw = dict(
        max_new_tokens=12,
        steps=6,
        block_length=4,
        cache=cache,
        threshold=0.3,
        alg="maskgit_plus",
        soft_mask=SOFT_MASKS[0],
        temperature=0.5,
        seed=0,
    )
    outs = [diffusion_generate(model, prompts().cuda(), cuda_graph=graph, **kw) for graph in (False, True)]
    assert torch.equal(outs[0], outs[1])
