"""Decoding speed of the MDLM family (``decode_bench.py --family mdlm``): the share of a sampling step spent on SM.

A step of MDLM's sampler with SM is the SM inputs (top-k/entropy and blend kernels over the previous log-probs), the
forward pass (DiT, SUBS log-probabilities) and the update (categorical draw over ``[B, N, V]``). Timed per part on
the sampler's own buffers, eagerly (CPU) or as replays of the captured CUDA graphs' parts (GPU), over a randomly
initialised DiT of the preset's shape (speed does not depend on the weights).

    python benchmarks/decode_bench.py --family mdlm                 # gpu preset on CUDA (169M DiT, 1024, batch 16)
    python benchmarks/decode_bench.py --family mdlm --preset cpu    # a small DiT with GPT-2's vocabulary
"""

from __future__ import annotations

import json

import torch

from softmask_ext import SoftMask
from softmask_ext.conventions import default_device
from softmask_ext.decoding.mdlm_samplers import MDLMSampler, MDLMSamplerOptions
from softmask_ext.model.mdlm import MDLMConfig, MDLMModel

import harness

PRESETS = {
    "cpu": {
        "model": {"hidden_dim": 256, "n_blocks": 2, "n_heads": 4},
        "length": 128,
        "batch": 2,
        "dtype": torch.float32,
        "repeats": 5,
    },
    # The paper's 169M model (MDLMConfig's defaults) at its length, batch 16.
    "gpu": {"model": {}, "length": 1024, "batch": 16, "dtype": torch.bfloat16, "repeats": 20},
}


@torch.no_grad()
def main(args) -> int:
    device = default_device()
    name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    preset = PRESETS[name]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = MDLMConfig(model_length=preset["length"], dropout=0.0, **preset["model"])
    model = MDLMModel(config).to(device=device, dtype=preset["dtype"]).eval()
    with torch.no_grad():
        model.backbone.output_layer.linear.weight.normal_(std=3.0 / config.hidden_dim**0.5)
    soft_mask = SoftMask(k=3, scale=0.5).to(device)
    runner = MDLMSampler(
        model,
        MDLMSamplerOptions(steps=preset["length"]),
        batch=preset["batch"],
        prompt_len=0,
        new_tokens=preset["length"],
        soft_mask=soft_mask,
        cuda_graph=device.type == "cuda",
        generator=torch.Generator(device=device).manual_seed(args.seed),
    )
    runner.load(None)
    runner.forward_part(soft=False)
    runner.draw_noise()
    runner.update_part()
    repeats = 1 if args.quick else args.repeats or preset["repeats"]

    def soft_inputs():
        region = runner.region
        return soft_mask.soft_rows(runner.log_p, None, region.reshape(-1), runner.embedding, config.mask_token_id)

    def step(part):
        def run():
            runner.step_index.zero_()
            runner.run_part(part, soft=True)

        return run

    timings = {
        name: harness.wall_time(fn, warmup=1, repeats=repeats, device=device)
        for name, fn in (("sm_inputs", soft_inputs), ("forward_with_sm", step("forward")), ("update", step("update")))
    }
    results = {f"{name}_ms": t.median_ms for name, t in timings.items()}
    step_ms = results["forward_with_sm_ms"] + results["update_ms"]
    results["step_ms"] = step_ms
    results["sm_share_of_step"] = results["sm_inputs_ms"] / step_ms
    # the worst and best pairings of the repeated runs: the largest SM time over the fastest step, and the reverse
    fastest = timings["forward_with_sm"].min_ms + timings["update"].min_ms
    slowest = timings["forward_with_sm"].max_ms + timings["update"].max_ms
    results["sm_share_of_step_range"] = [timings["sm_inputs"].min_ms / slowest, timings["sm_inputs"].max_ms / fastest]
    report = {
        "family": "mdlm",
        "preset": name,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else harness.cpu_model(),
        "dtype": str(preset["dtype"]).removeprefix("torch."),
        "batch": preset["batch"],
        "length": preset["length"],
        "vocab_size": config.vocab_size,
        "hidden_dim": config.hidden_dim,
        "n_blocks": config.n_blocks,
        "cuda_graph": device.type == "cuda",
        "repeats": repeats,
        "results": results,
        "timings": {name: t.to_dict() for name, t in timings.items()},
    }
    print(json.dumps(results, indent=2))
    if args.out:
        harness.write_results(args.out, report, device=device)
    return 0
