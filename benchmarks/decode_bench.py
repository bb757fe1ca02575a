"""Decoding speed: our engine (binary and soft-masked, eager and CUDA graph) against Dream's reference loop and the
authors' dense soft-masking path, on a randomly initialised model (speed does not depend on the weights).

    python benchmarks/decode_bench.py                      # GPU preset on CUDA, CPU preset otherwise
    python benchmarks/decode_bench.py --preset cpu --out benchmarks/results/decode_bench_cpu.json
    python benchmarks/decode_bench.py --modes dream,plain,prefix,dual --new-tokens 512 --threads 2   # fast decoding

Providers, all decoding the same prompts with the same settings:
    dream_reference   Dream's own binary decoding loop (full logits every step, host syncs, no graphs)
    authors_sm        the same loop with the authors' soft-masking (dense [B*T, V] mixture @ embedding table)
    engine_binary_*   softmask_ext's engine with plain masks, eager / CUDA graph
    engine_sm_*       softmask_ext's engine with soft-masking, eager / CUDA graph

Reported per provider, batch and step count: tokens/s (generated tokens per second of decoding, after one warm-up run on
a GPU, which also captures the engine's CUDA graph; its time is reported as warmup_s), ms per step, the share of step
time spent building soft-mask inputs and (binary engine) proposing tokens (filters such as top-p, sampling,
confidences), each timed apart on real logits, and whether the tokens agree with the matching reference provider.
ms/step does not depend on the step count (every step has the same shapes), so when the time budget runs out a larger
step count is extrapolated from the measured ms/step and marked so. Token agreement with the reference providers is
meaningful in fp32 (CPU preset); in bf16 Dream's loop ranks bf16-rounded confidences, full of ties, while the engine
ranks fp32 ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from softmask_ext import DreamConfig, DreamModel, SoftMask
from softmask_ext.conventions import DTYPE_NAMES, default_device
from softmask_ext.decoding import (
    SM_INPUTS_RANGE,
    DecodeOptions,
    DiffusionDecoder,
    check_prompt,
    diffusion_generate,
)
from softmask_ext.decoding.sampling import propose
from softmask_ext.model.llada import LLaDAModel
from softmask_ext.model.llada_config import LLaDAConfig

import harness
from dream_reference import authors_soft_embeddings, reference_generate

PRESETS = {
    # A shallow model with Dream's vocabulary: the vocabulary-sized work (LM head, softmax, SM) dominates.
    "cpu": dict(
        model=dict(
            hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        ),
        dtype="float32",
        prompt=64,
        new_tokens=64,
        steps=[16],
        batch=[1],
        repeats=3,
    ),
    # Dream-7B's shapes (DreamConfig's defaults).
    # Three timed runs each (the median and the range are recorded): at batch 1 the time per step of one provider
    # has differed by a third between single runs.
    "gpu": dict(model={}, dtype="bfloat16", prompt=256, new_tokens=256, steps=[256, 128, 64], batch=[1, 8], repeats=3),
}
# The example transparency_config.json of the SM paper's code release.
SOFT_MASK = {
    "transparency_alg": "mixinputs_with_topk",
    "transparency_scale": 0.25,
    "transparency_centre": -1,
    "transparency_steepness": 5,
    "mixinputs_k": 1,
    "transparency_scheduling": "none",
}
# --modes: Dream's own loop; our engine over the whole sequence, one token per step; blocks with a prefix / dual K/V
# cache and threshold parallel decoding.
MODES = ("dream", "plain", "prefix", "dual")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: gpu on CUDA, cpu otherwise")
    p.add_argument("--quick", action="store_true", help="one timed run per setting, tiny budget (dry runs)")
    p.add_argument("--budget-s", type=float, default=180.0, help="wall-clock budget for the timed runs")
    p.add_argument("--repeats", type=int, help="timed runs per setting, the median is reported (default: preset's)")
    p.add_argument("--alg", default="entropy")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument(
        "--modes",
        help=f"comma-separated, from {MODES}: compare the decoding modes (with and without SM) "
        "instead of the providers",
    )
    p.add_argument("--new-tokens", default="256,512,1024", help="--modes: comma-separated generation lengths")
    p.add_argument("--block-length", type=int, default=32, help="--modes: block length of prefix/dual")
    p.add_argument("--threshold", type=float, default=0.9, help="--modes: threshold of prefix/dual")
    p.add_argument(
        "--family",
        choices=("dream", "llada", "mdlm"),
        default="dream",
        help="a random model of this family (LLaDA: the engine's providers and modes only, no Dream loop); mdlm: "
        "the SM share of an MDLM sampling step (mdlm_decode_bench.py)",
    )
    return p.parse_args(argv)


def timed(fn, device):
    """(seconds, fn's result) of one call, the device synchronised around it."""
    ms, out = harness.timed(fn, device)
    return ms / 1e3, out


def build_model(preset: dict, device: torch.device, family: str = "dream") -> torch.nn.Module:
    positions = max(4096, preset["prompt"] + preset["new_tokens"])
    if family == "llada":  # the preset's shape (the GPU preset's defaults: LLaDA-8B's) with LLaDA's vocabulary
        config, model_class = LLaDAConfig(**preset["model"], max_position_embeddings=positions), LLaDAModel
    else:
        config, model_class = DreamConfig(**preset["model"], max_position_embeddings=positions), DreamModel
    dtype = DTYPE_NAMES[preset["dtype"]]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in the target dtype, directly on the device
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(default)
    # Random weights at the pretraining scale predict a near-uniform distribution over 152k tokens, where rounding
    # alone decides between positions; a larger LM head gives peaked predictions, as a trained model makes, so that
    # the token agreement between providers means something. Speed is unaffected.
    model.get_output_embeddings().weight.detach().normal_(std=3.0 / model.config.hidden_size**0.5)
    return model.eval()


class Provider:
    """One way of decoding: ``run()`` returns the sequences; ``sm_ms()`` times its SM input building alone."""

    def __init__(self, name, reference, soft_mask, graph=None):
        self.name, self.reference, self.soft_mask, self.graph = name, reference, soft_mask, graph

    @property
    def uses_sm(self) -> bool:
        return self.soft_mask is not None

    def setup(self, model, ids, steps, args):
        self.model, self.ids, self.steps = model, ids, steps
        self.mask_id = model.config.mask_token_id
        alg = "low_confidence" if args.family == "llada" else args.alg  # LLaDA's remasking rule
        self.settings = dict(
            max_new_tokens=self.new_tokens, steps=steps, alg=alg, temperature=args.temperature, top_p=args.top_p
        )
        if not self.reference:
            options = DecodeOptions(mask_token_id=self.mask_id, **self.settings)
            self.prompt = check_prompt(
                ids, None, options, vocab_size=model.config.vocab_size, max_positions=None, device=ids.device
            )
            self.decoder = DiffusionDecoder(
                model,
                options,
                batch=ids.shape[0],
                prompt_len=ids.shape[1],
                padded=False,
                decode_from=self.prompt.first_mask,
                soft_mask=self.soft_mask,
                cuda_graph=self.graph,
                generator=torch.Generator(ids.device).manual_seed(args.seed),
            )

    def run(self) -> torch.Tensor:
        if self.reference:
            return reference_generate(
                self.model, self.ids, mask_token_id=self.mask_id, soft_mask=self.soft_mask, **self.settings
            )
        return self.decoder.run(self.prompt)[0]

    def propose_ms(self, reps: int) -> harness.Timing:
        """Milliseconds of one step's token proposals (filters such as top-p, sampling, confidences) on the first
        step's logits (the engine proposes for every position of the region at every step)."""
        decoder = self.decoder
        decoder.load(self.prompt)
        decoder.noise.draw()
        logits = decoder.logits("full", decoder.full_rows)
        opts = decoder.options
        return self._time_ms(
            lambda: propose(
                logits,
                alg=opts.alg,
                temperature=opts.temperature,
                top_p=opts.top_p,
                top_k=opts.top_k,
                token_noise=decoder.noise.token,
            ),
            reps,
        )

    def _time_ms(self, work, reps: int) -> harness.Timing:
        """Milliseconds per call of ``work`` over five samples of ``reps`` calls each (captured in a CUDA graph first
        when this provider replays graphs)."""
        work()
        if self.graph:  # the engine runs it inside its step's graph: time it the same way
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                work()
            work = graph.replay
        timing = harness.wall_time(lambda: [work() for _ in range(reps)], warmup=0, repeats=5, device=self.ids.device)
        return harness.Timing.of([ms / reps for ms in timing.samples_ms])

    def sm_ms(self, reps: int) -> harness.Timing:
        """Milliseconds to build one step's SM inputs, on this step's logits with half the positions masked."""
        model, ids = self.model, self.ids
        batch, prompt_len = ids.shape
        x = torch.cat([ids, torch.full((batch, self.new_tokens), self.mask_id, device=ids.device)], dim=1)
        x[:, prompt_len::2] = 7  # half of the generated positions already decoded
        if self.reference:
            logits = model(input_ids=x).logits
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            work = lambda: authors_soft_embeddings(model, x, logits, self.soft_mask, self.mask_id, self.new_tokens)  # noqa: E731
        else:
            decoder = self.decoder
            decoder.canvas.copy_(x)
            decoder.embeds.copy_(model.get_input_embeddings()(x))
            logits = decoder.logits("full", decoder.full_rows)
            work = lambda: decoder.soft_embeddings(logits)  # noqa: E731
        return self._time_ms(work, reps)


def providers(soft_mask: SoftMask, cuda: bool, references: bool = True) -> list[Provider]:
    """Dream's loop and the authors' SM path (``references``: Dream models only), then the engine's providers."""
    out = [Provider("dream_reference", True, None), Provider("authors_sm", True, soft_mask)] if references else []
    for graph in [False, True] if cuda else [False]:
        kind = "graph" if graph else "eager"
        out += [
            Provider(f"engine_binary_{kind}", False, None, graph),
            Provider(f"engine_sm_{kind}", False, soft_mask, graph),
        ]
    return out


@torch.no_grad()
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.family == "mdlm":
        from mdlm_decode_bench import main as mdlm_main

        return mdlm_main(args)
    device = default_device()
    preset_name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    preset = PRESETS[preset_name]
    args.repeats = args.repeats or preset["repeats"]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.budget_s = 1, min(args.budget_s, 30.0)
    torch.manual_seed(args.seed)
    if args.modes:
        return run_modes(args, preset_name, preset, device)
    started = time.perf_counter()

    model = build_model(preset, device, args.family)
    soft_mask = SoftMask.from_any(SOFT_MASK).to(device)
    references = args.family == "dream"  # Dream's loop and the authors' SM path decode Dream models only
    prompt_len, new_tokens = preset["prompt"], preset["new_tokens"]
    vocab, mask_id = model.config.vocab_size, model.config.mask_token_id
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else harness.cpu_model()
    print(
        f"decode_bench: preset {preset_name} on {device_name}, {preset['dtype']}, prompt {prompt_len}, "
        f"{new_tokens} new tokens, steps {preset['steps']}, batch {preset['batch']}",
        file=sys.stderr,
    )

    results = []
    measured: dict[tuple[str, int], float] = {}  # (provider, batch) -> ms per step
    outputs: dict[tuple[str, int, int], torch.Tensor] = {}
    plan = [(b, s) for b in preset["batch"] for s in sorted(preset["steps"])]
    progress = tqdm(
        total=len(plan) * len(providers(soft_mask, device.type == "cuda", references)),
        desc="decode_bench",
        file=sys.stderr,
    )
    for batch, steps in plan:
        gen = torch.Generator().manual_seed(args.seed + batch)
        ids = torch.randint(0, mask_id, (batch, prompt_len), generator=gen).to(device)
        for provider in providers(soft_mask, device.type == "cuda", references):
            provider.new_tokens = new_tokens
            key = (provider.name, batch)
            row = dict(
                provider=provider.name, batch=batch, steps=steps, sm=provider.uses_sm, graph=bool(provider.graph)
            )
            remaining = args.budget_s - (time.perf_counter() - started)
            runs = args.repeats + (device.type == "cuda")  # timed runs + the warm-up run
            estimate = measured.get(key, 0.0) * steps * runs / 1000
            if key in measured and estimate > remaining:
                ms = measured[key]
                row.update(ms_per_step=ms, tokens_per_s=batch * new_tokens / (ms * steps / 1000), extrapolated=True)
            else:
                provider.setup(model, ids, steps, args)
                if device.type == "cuda":
                    # warm-up: cuBLAS handles, rotary tables, the caching allocator, and the engine's graph capture
                    # (done once per decoder, as a serving loop would); its time is reported apart
                    row["warmup_s"] = timed(provider.run, device)[0]
                runs = [timed(provider.run, device) for _ in range(args.repeats)]
                times, out = [t for t, _ in runs], runs[-1][1]
                seconds = sorted(times)[len(times) // 2]
                ms = 1000 * seconds / steps
                measured[key] = ms
                outputs[(provider.name, batch, steps)] = out
                row.update(
                    ms_per_step=ms,
                    tokens_per_s=batch * new_tokens / seconds,
                    seconds=seconds,
                    timing=harness.Timing.of([1e3 * t for t in times]).to_dict(),
                    extrapolated=False,
                )
                # The parts of a step, timed once per provider and batch (they do not depend on the step count).
                parts = {"sm": provider.uses_sm, "propose": provider.name.startswith("engine_binary")}
                for part, wanted in parts.items():
                    if wanted and not any(
                        r["provider"] == provider.name and r["batch"] == batch and f"{part}_ms" in r for r in results
                    ):
                        part_ms = getattr(provider, f"{part}_ms")(reps=5 if device.type == "cuda" else 2)
                        row.update(
                            {
                                f"{part}_ms": part_ms.median_ms,
                                f"{part}_ms_range": [part_ms.min_ms, part_ms.max_ms],
                                f"{part}_share": part_ms.median_ms / ms,
                            }
                        )
            results.append(row)
            progress.update()
    progress.close()

    agreement = {}
    for (name, batch, steps), out in outputs.items():
        ref = "authors_sm" if "_sm_" in name else "dream_reference"
        if name.startswith("engine") and (ref, batch, steps) in outputs:
            generated = out[:, prompt_len:]
            agreement[f"{name}/b{batch}/s{steps}"] = float(
                (generated == outputs[(ref, batch, steps)][:, prompt_len:]).float().mean()
            )

    summary = summarise(results)
    report = dict(
        device=device_name,
        preset=preset_name,
        family=args.family,
        dtype=preset["dtype"],
        prompt=prompt_len,
        new_tokens=new_tokens,
        vocab=vocab,
        model=dict(layers=model.config.num_hidden_layers, hidden=model.config.hidden_size),
        settings=dict(alg=args.alg, temperature=args.temperature, top_p=args.top_p, soft_mask=SOFT_MASK),
        repeats=args.repeats,
        wall_s=time.perf_counter() - started,
        results=results,
        token_agreement=agreement,
        summary=summary,
    )
    print_table(report)
    if args.out:
        harness.write_results(args.out, report, device=device)
    return 0


def run_modes(args, preset_name: str, preset: dict, device: torch.device) -> int:
    """tokens/s, forward passes (NFE) and ms per forward of each mode, binary and SM, at each generation length.

    ``dream`` and ``plain`` take one token per step over the whole sequence; every step has the same shapes, so they are
    timed over a few steps from the run's midpoint (:func:`mode_call`) and their time for ``N`` steps is extrapolated
    (marked so). ``prefix`` and ``dual`` decode in blocks with threshold parallel decoding: their step counts depend
    on the predictions, so they run in full. Each setting is timed ``--repeats`` times, binary and SM interleaved
    (median and range); on a GPU after one untimed run (graph capture). Decoding is deterministic (greedy, fixed
    seeds), so every call takes the same forwards.

    On the CPU, ``sm_share`` is the share of an SM run spent building SM inputs, from one more run under the profiler
    (:func:`sm_share_of_run`): the work SM adds, free of the machine's drift between runs. Two SM ratios per mode, each
    the median (and range) over rounds of the ratio of the round's SM and binary runs:
    ``sm_step_cost`` compares the time of one forward (the price of building SM inputs, with the same work per
    forward), ``sm_vs_binary`` compares tokens/s, which under threshold decoding also moves with the number of
    forwards, since SM changes the predictions that decide how many tokens pass the threshold.
    """
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or (args.family == "llada" and "dream" in modes):
        raise SystemExit(
            f"--modes: unknown or unavailable modes {unknown or ['dream']} (choose from {MODES}; "
            "Dream's loop needs --family dream)"
        )
    lengths = [int(n) for n in args.new_tokens.split(",")]
    model = build_model(dict(preset, new_tokens=max(lengths)), device, args.family)
    soft_mask = SoftMask.from_any(SOFT_MASK).to(device)
    mask_id = model.config.mask_token_id
    forwards = [0]
    handle = model.register_forward_pre_hook(lambda module, inputs: forwards.__setitem__(0, forwards[0] + 1))
    probe_steps = 4
    rows = []
    started = time.perf_counter()
    ids = torch.randint(0, mask_id, (1, preset["prompt"]), generator=torch.Generator().manual_seed(args.seed))
    ids = ids.to(device)
    for new_tokens in lengths:
        for mode in modes:
            calls = [
                mode_call(args, model, ids, mode, new_tokens, sm_module, probe_steps) for sm_module in (None, soft_mask)
            ]
            nfe: list[list[int]] = [[], []]
            warmup = int(device.type == "cuda")  # graph capture
            # Binary and SM interleaved (paired_wall_time): the SM ratios compare runs of the same round.
            timings = harness.paired_wall_time(
                [counting(call, forwards, n) for (call, _), n in zip(calls, nfe)],
                warmup=warmup,
                repeats=args.repeats,
                device=device,
            )
            for sm, timing in zip((False, True), timings):
                steps, forward_count = calls[sm][1], nfe[sm][-1]  # every call decodes the same (deterministic) steps
                extrapolated = steps == probe_steps and forward_count == probe_steps
                scale = new_tokens / forward_count if extrapolated else 1.0  # to the full length: a token a forward
                seconds = [scale * ms / 1e3 for ms in (timing.median_ms, timing.min_ms, timing.max_ms)]
                rows.append(
                    dict(
                        mode=mode,
                        sm=sm,
                        new_tokens=new_tokens,
                        tokens_per_s=new_tokens / seconds[0],
                        tokens_per_s_range=[new_tokens / seconds[2], new_tokens / seconds[1]],
                        nfe=new_tokens if extrapolated else forward_count,
                        ms_per_step=timing.median_ms / forward_count,
                        seconds=seconds[0],
                        timing=timing.to_dict(),
                        extrapolated=extrapolated,
                    )
                )
                if sm and mode != "dream" and device.type == "cpu":
                    rows[-1]["sm_share"] = sm_share_of_run(calls[1][0])
                r = rows[-1]
                print(
                    f"{mode:<8}{'SM' if sm else 'binary':<8}{new_tokens:>6} tokens: {r['tokens_per_s']:9.1f} tokens/s "
                    f"[{r['tokens_per_s_range'][0]:.1f}, {r['tokens_per_s_range'][1]:.1f}], NFE {r['nfe']:>5}, "
                    f"{r['ms_per_step']:8.2f} ms/step" + (" (extrapolated)" if extrapolated else ""),
                    file=sys.stderr,
                )
    handle.remove()
    summary = {str(n): mode_ratios([r for r in rows if r["new_tokens"] == n], modes) for n in lengths}
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else harness.cpu_model()
    report = dict(
        device=device_name,
        preset=preset_name,
        family=args.family,
        dtype=preset["dtype"],
        prompt=preset["prompt"],
        vocab=model.config.vocab_size,
        layers=model.config.num_hidden_layers,
        hidden=model.config.hidden_size,
        block_length=args.block_length,
        threshold=args.threshold,
        alg=args.alg,
        soft_mask=SOFT_MASK,
        repeats=args.repeats,
        wall_s=time.perf_counter() - started,
        results=rows,
        summary=summary,
    )
    print(json.dumps(summary, indent=2))
    if args.out:
        harness.write_results(args.out, report, device=device)
        plot_modes(report, str(Path(args.out).with_suffix(".png")))
    return 0


def sm_share_of_run(call) -> float:
    """The share of one run's wall time spent building SM inputs: the engine's ``SM_INPUTS_RANGE`` under
    torch.profiler (CPU only: on CUDA the steps replay graphs, whose inside the profiler's ranges do not see). The
    profiler's per-op overhead lengthens the SM range and the rest alike, so the share stays close to the unprofiled
    one; the runs it times are not those of the tokens/s columns."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        start = time.perf_counter()
        call()
        wall = time.perf_counter() - start
    sm_us = sum(event.cpu_time_total for event in profile.key_averages() if event.key == SM_INPUTS_RANGE)
    return sm_us / 1e6 / wall


def counting(call, forwards: list[int], counts: list[int]):
    """``call`` that also appends the forward passes it ran (the growth of ``forwards[0]``, a hook's counter) to
    ``counts``."""

    def run() -> None:
        before = forwards[0]
        call()
        counts.append(forwards[0] - before)

    return run


def half_decoded(ids: torch.Tensor, new_tokens: int, mask_id: int) -> torch.Tensor:
    """``ids`` followed by ``new_tokens`` positions of which every other one (the first included) is still masked:
    the canvas halfway through a one-token-per-step run, as a prompt (its masks are decoded like new tokens)."""
    region = torch.randint(0, mask_id, (ids.shape[0], new_tokens), generator=torch.Generator().manual_seed(1))
    region[:, ::2] = mask_id
    return torch.cat([ids, region.to(ids.device)], dim=1)


def mode_call(args, model, ids, mode: str, new_tokens: int, soft_mask, probe_steps: int):
    """(the decoding call of ``mode``, its step count): Dream's loop and ``plain`` over ``probe_steps`` steps,
    ``prefix``/``dual`` blocks with threshold decoding over the whole generation.

    A one-token-per-step run does less work per step as its masks are filled (SM blends only masked positions,
    Dream's loop proposes only for them), falling linearly over the run; so the probe steps start halfway, from
    :func:`half_decoded`, and their time per step is the run's mean."""
    mask_id = model.config.mask_token_id
    if mode in ("dream", "plain"):
        if mode == "dream":
            decode, keywords = reference_generate, dict(mask_token_id=mask_id, alg=args.alg)
        else:
            decode, keywords = diffusion_generate, ({} if args.family == "llada" else dict(alg=args.alg))
        probe = half_decoded(ids, new_tokens, mask_id)
        call = partial(decode, model, probe, max_new_tokens=0, steps=probe_steps, soft_mask=soft_mask, **keywords)
        return call, probe_steps
    keywords = dict(block_length=args.block_length, threshold=args.threshold, cache=mode)
    if args.family == "dream":
        keywords["alg"] = "maskgit_plus"
    call = partial(
        diffusion_generate, model, ids, max_new_tokens=new_tokens, steps=new_tokens, soft_mask=soft_mask, **keywords
    )
    return call, new_tokens


def mode_ratios(rows: list[dict], modes: list[str]) -> dict[str, float | list[float]]:
    """Per generation length: SM against binary in each mode (per forward and in tokens/s: the median and range over
    rounds of the paired runs' ratio), and the fast modes against plain and Dream's loop (ratio of medians, range from
    the worst to the best pairing of the repeated runs)."""
    by = {(r["mode"], r["sm"]): r for r in rows}
    out: dict[str, float | list[float]] = {}
    for m in modes:
        binary, sm = by[(m, False)], by[(m, True)]
        rounds = zip(binary["timing"]["samples_ms"], sm["timing"]["samples_ms"])
        time_ratios = sorted(s / b for b, s in rounds)  # SM time / binary time, round by round
        forwards = binary["nfe"] / sm["nfe"]
        out[f"sm_step_cost_{m}"] = statistics.median(time_ratios) * forwards
        out[f"sm_step_cost_{m}_range"] = [time_ratios[0] * forwards, time_ratios[-1] * forwards]
        out[f"sm_vs_binary_{m}"] = 1 / statistics.median(time_ratios)
        out[f"sm_vs_binary_{m}_range"] = [1 / time_ratios[-1], 1 / time_ratios[0]]
        if "sm_share" in sm:
            out[f"sm_share_{m}"] = sm["sm_share"]
    for fast in ("prefix", "dual"):
        for base in ("plain", "dream"):
            if fast in modes and base in modes:
                a, b = by[(fast, False)], by[(base, False)]
                out[f"{fast}_vs_{base}"] = a["tokens_per_s"] / b["tokens_per_s"]
                out[f"{fast}_vs_{base}_range"] = [
                    a["tokens_per_s_range"][0] / b["tokens_per_s_range"][1],
                    a["tokens_per_s_range"][1] / b["tokens_per_s_range"][0],
                ]
    return out


def plot_modes(report: dict, path: str) -> None:
    """tokens/s per mode (binary and SM bars), one panel per generation length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["new_tokens"] for r in report["results"]})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.4), constrained_layout=True, squeeze=False)
    for ax, n in zip(axes[0], lengths):
        rows = [r for r in report["results"] if r["new_tokens"] == n]
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        for offset, sm in ((-0.2, False), (0.2, True)):
            values = [next(r["tokens_per_s"] for r in rows if r["mode"] == m and r["sm"] == sm) for m in modes]
            ax.bar([i + offset for i in range(len(modes))], values, width=0.4, label="SM" if sm else "binary")
        ax.set_xticks(range(len(modes)), modes)
        ax.set_yscale("log")
        ax.set_title(f"{n} new tokens")
        ax.set_ylabel("tokens/s")
    axes[0][0].legend()
    fig.suptitle(
        f"{report['device']}, {report['family']}, block {report['block_length']}, threshold {report['threshold']}"
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(results: list[dict]) -> list[dict]:
    """The target ratios per (batch, steps): ours vs the authors' path and vs Dream's binary loop."""
    by = {(r["provider"], r["batch"], r["steps"]): r for r in results}
    out = []
    for batch, steps in sorted({(r["batch"], r["steps"]) for r in results}):
        rows = {name: by[(name, b, s)] for (name, b, s) in by if (b, s) == (batch, steps)}
        tps = {name: row["tokens_per_s"] for name, row in rows.items()}
        best_sm = "engine_sm_graph" if "engine_sm_graph" in tps else "engine_sm_eager"
        share = [r["sm_share"] for r in results if r["provider"] == best_sm and r["batch"] == batch and "sm_share" in r]
        entry = dict(batch=batch, steps=steps, sm_engine=best_sm, sm_share=share[0] if share else None)
        if "authors_sm" in tps:
            entry.update(
                sm_vs_authors=tps[best_sm] / tps["authors_sm"],
                sm_vs_dream_binary=tps[best_sm] / tps["dream_reference"],
            )
        if "engine_sm_graph" in tps:
            entry["graph_vs_eager_binary"] = tps["engine_binary_graph"] / tps["engine_binary_eager"]
            entry["graph_vs_eager_sm"] = tps["engine_sm_graph"] / tps["engine_sm_eager"]
        out.append(entry)
    return out


def print_table(report: dict) -> None:
    print(
        f"\n{report['device']} | {report['preset']} preset, {report['dtype']}, prompt {report['prompt']}, "
        f"{report['new_tokens']} new tokens, vocab {report['vocab']}, alg {report['settings']['alg']}, "
        f"temperature {report['settings']['temperature']}"
    )
    print(
        f"{'provider':<22}{'batch':>6}{'steps':>6}{'tokens/s':>11}{'ms/step':>10}{'SM ms':>8}{'SM share':>10}"
        f"{'propose ms':>12}{'share':>8}"
    )
    for r in report["results"]:
        ms = {k: f"{r[k]:.2f}" if k in r else "" for k in ("sm_ms", "propose_ms")}
        share = {k: f"{100 * r[k]:.1f}%" if k in r else "" for k in ("sm_share", "propose_share")}
        mark = " (extrapolated)" if r["extrapolated"] else ""
        print(
            f"{r['provider']:<22}{r['batch']:>6}{r['steps']:>6}{r['tokens_per_s']:>11.1f}{r['ms_per_step']:>10.2f}"
            f"{ms['sm_ms']:>8}{share['sm_share']:>10}{ms['propose_ms']:>12}{share['propose_share']:>8}{mark}"
        )
    for s in report["summary"]:
        ratios = "".join(
            f", {k.removeprefix('sm_vs_')} {v:.2f}x" for k, v in s.items() if k.startswith(("sm_vs", "graph"))
        )
        share = f"SM {100 * s['sm_share']:.1f}% of a step" if s["sm_share"] is not None else "SM share not measured"
        print(f"batch {s['batch']} steps {s['steps']}: {s['sm_engine']}: {share}{ratios}")
    if report["token_agreement"]:
        worst = min(report["token_agreement"].items(), key=lambda kv: kv[1])
        print(f"token agreement with the reference providers: min {worst[1]:.3f} ({worst[0]})")


if __name__ == "__main__":
    sys.exit(main())
