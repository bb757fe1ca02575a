"""The MDLM paths of the command-line tools: ``generate`` and ``evaluate --task ppl|genppl|mauve``."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny_mdlm import TINY_CONFIG, write_checkpoint

from softmask_ext import evaluate, generate
from softmask_ext.evaluation.mdlm_metrics import MAUVE_MISSING

ASSETS = "softmask_ext/assets/tiny-coder"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mdlm-cli")
    write_checkpoint(
        str(path),
        cfg={
            **TINY_CONFIG,
            "vocab_size": 512,
            "mask_token_id": 1,
            "eos_token_id": 0,
            "pad_token_id": 0,
            "model_length": 32,
        },
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(f"{ASSETS}/{name}", path / name)
    return path


def test_generate_samples_from_an_mdlm_checkpoint(checkpoint, capsys):
    code = generate.main(
        [
            "--model",
            str(checkpoint),
            "--prompt",
            "def f(",
            "--max-new-tokens",
            "8",
            "--steps",
            "8",
            "--sampler",
            "remdm-cap",
            "--seed",
            "1",
        ]
    )
    assert code == 0 and capsys.readouterr().out.startswith("def f(")
    with pytest.raises(SystemExit, match="ReMDM schedule 'nope' does not exist"):
        generate.main(["--model", str(checkpoint), "--prompt", "", "--sampler", "remdm-nope"])


def test_evaluate_ppl_and_mauve(checkpoint, tmp_path, capsys):
    report = evaluate.main(
        [
            "--model",
            str(checkpoint),
            "--task",
            "ppl",
            "--limit",
            "2",
            "--max-length",
            "32",
            "--num-samples",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert report["results"]["tokens"] == 64 and report["results"]["perplexity"] > 1
    saved = json.loads((tmp_path / "ppl.json").read_text())
    assert saved["task"] == "ppl" and saved["environment"]["extension_loaded"] is not None
    with pytest.raises(SystemExit, match="needs --scorer"):
        evaluate.main(
            [
                "--model",
                str(checkpoint),
                "--task",
                "genppl",
                "--samples",
                "1",
                "--steps",
                "4",
                "--max-length",
                "32",
                "--out",
                str(tmp_path),
            ]
        )
    try:
        import mauve  # noqa: F401
    except ImportError:
        report = evaluate.main(
            [
                "--model",
                str(checkpoint),
                "--task",
                "mauve",
                "--samples",
                "1",
                "--steps",
                "4",
                "--limit",
                "2",
                "--max-length",
                "32",
                "--out",
                str(tmp_path),
            ]
        )
        assert report["results"] == {"skipped": MAUVE_MISSING}
        assert MAUVE_MISSING in capsys.readouterr().err
