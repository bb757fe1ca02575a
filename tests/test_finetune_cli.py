"""`python -m softmask_ext.finetune`: presets, data errors, adapters, and a shortened run of the default."""

from __future__ import annotations

import json

import pytest
from _training_helpers import CODE, make_model_dir
from safetensors.torch import load_file

from softmask_ext import SoftMask
from softmask_ext.conventions import SHIPPED_MODEL
from softmask_ext.finetune import main, parse_args, resolve_settings
from softmask_ext.model import DreamConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w") as f:
        for i, code in enumerate(CODE):
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"Show code {i % 5}."},
                            {"role": "assistant", "content": code},
                        ]
                    }
                )
                + "\n"
            )
    return path


def test_dream_paper_preset_is_the_default_for_7b_models_and_flags_override_it():
    seven_b = DreamConfig()  # Dream-v0-7B's shapes
    s = resolve_settings(parse_args([]), seven_b)
    assert s["preset"] == "dream-paper"
    assert (s["adapter"], s["rank"], s["alpha"], s["lora_dropout"]) == ("dora", 16, 16.0, 0.0)
    assert (s["lr"], s["sm_lr"], s["warmup_ratio"], s["clip"]) == (1e-5, 1e-2, 0.03, 7.0)
    assert (s["batch_size"], s["grad_accum"], s["max_length"], s["sm_prob"]) == (1, 8, 2048, 0.5)
    assert s["bf16"] and s["gradient_checkpointing"] and s["max_steps"] is None
    assert (s["sm_init_scale"], s["sm_init_centre"]) == (0.0, -0.75)  # the paper's initialisation
    s = resolve_settings(parse_args(["--lora", "--rank", "8", "--lr", "2e-5", "--no-bf16"]), seven_b)
    assert (s["adapter"], s["rank"], s["lr"], s["bf16"], s["alpha"]) == ("lora", 8, 2e-5, False, 16.0)
    small = DreamConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mask_token_id=1,
        pad_token_id=0,
        eos_token_id=0,
        bos_token_id=0,
    )
    tiny = resolve_settings(parse_args([]), small)
    assert tiny["preset"] == "tiny"
    # The paper's SM start in both presets; the tiny run is short, so its SM parameters learn faster.
    assert (tiny["sm_init_scale"], tiny["sm_init_centre"], tiny["sm_lr"]) == (0.0, -0.75, 0.3)
    assert resolve_settings(parse_args(["--sm-init-centre", "-1.5"]), small)["sm_init_centre"] == -1.5
    assert resolve_settings(parse_args(["--preset", "dream-paper"]), small)["adapter"] == "dora"


def test_malformed_data_is_a_clear_error_naming_file_and_line(model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{not json\n")
    with pytest.raises(SystemExit, match=r"bad\.jsonl.*line 2|line 2.*bad\.jsonl"):
        main(["--model", str(model_dir), "--data", str(bad), "--output-dir", str(tmp_path)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit, match="empty|no records"):
        main(["--model", str(model_dir), "--data", str(empty), "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="no config.json"):
        main(["--model", str(tmp_path), "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="missing.jsonl"):
        main(["--model", str(model_dir), "--data", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path)])


def test_bad_settings_are_a_clear_error(model_dir, data_file, tmp_path, capsys):
    with pytest.raises(SystemExit, match="sm_prob"):
        main(["--model", str(model_dir), "--data", str(data_file), "--output-dir", str(tmp_path), "--sm-prob", "2"])
    for centre, message in (("0.5", "must be < 0"), ("high", "'auto' or a negative number")):
        with pytest.raises(SystemExit):
            parse_args(["--sm-init-centre", centre])
        assert message in capsys.readouterr().err


def test_binary_run_reports_only_the_binary_loss(model_dir, data_file, tmp_path, capsys):
    """--sm-prob 0 (the binary baseline) trains no SM parameters and validates with plain masks only."""
    summary = main(
        [
            "--model",
            str(model_dir),
            "--data",
            str(data_file),
            "--output-dir",
            str(tmp_path),
            "--full",
            "--sm-prob",
            "0",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--max-length",
            "128",
            "--eval-batches",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert "val_soft_mask" not in summary and summary["soft_mask"] == {"transparency_alg": "none"}
    # Exactly what the authors' binary runs write, beside the run and the final model: binary decoding when read.
    run = tmp_path / f"{model_dir.name}-sm"  # the default name: <model folder>-sm
    for folder in (run, run / "final"):
        assert json.loads((folder / "transparency_config.json").read_text()) == {"transparency_alg": "none"}
        assert SoftMask.from_transparency_config(folder) is None
    out = capsys.readouterr().out
    assert "soft masks:   not evaluated (--sm-prob 0" in out and "learned soft mask" not in out
    assert json.loads(out.strip().splitlines()[-1])["val_soft_mask"] is None


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapter_run_writes_peft_adapters_and_transparency_config(model_dir, data_file, tmp_path, capsys, kind):
    summary = main(
        [
            "--model",
            str(model_dir),
            "--data",
            str(data_file),
            "--output-dir",
            str(tmp_path),
            "--name",
            kind,
            f"--{kind}",
            "--rank",
            "4",
            "--alpha",
            "8",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--max-length",
            "128",
            "--eval-batches",
            "1",
            "--device",
            "cpu",
        ]
    )
    final = tmp_path / kind / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["use_dora"] == (kind == "dora")
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert all("lora_" in k or "magnitude" in k for k in load_file(str(final / "adapter_model.safetensors")))
    assert SoftMask.from_transparency_config(final).to_transparency_config() == summary["soft_mask"]
    out = capsys.readouterr().out
    assert "binary masks" in out and "soft masks" in out and str(tmp_path / kind) in out


@pytest.mark.skipif(not (SHIPPED_MODEL / "model.safetensors").exists(), reason="the tiny model has not been built yet")
def test_default_run_shortened(tmp_path, capsys):
    """The no-argument command with fewer steps and a smaller corpus slice: same code path end to end."""
    summary = main(
        [
            "--output-dir",
            str(tmp_path),
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--eval-batches",
            "1",
            "--max-chars",
            "400000",
        ]
    )
    run = tmp_path / f"{SHIPPED_MODEL.name}-sm"
    assert (run / "final" / "model.safetensors").exists() and (run / "training.png").exists()
    assert (run / "final" / "tokenizer.json").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and records[-1]["val_binary"] == summary["val_binary"]
    out = capsys.readouterr().out
    assert "binary masks" in out and "soft masks" in out and "transparency_config" in out
    assert "started at scale 1e-06, steepness 6.667, centre -0.75" in out  # the paper's SM start
    assert records[0]["centre"] == pytest.approx(-0.75, abs=0.05)


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED_MODEL / "model.safetensors").exists(), reason="the tiny model has not been built yet")
def test_default_run_learns_soft_masking_from_the_papers_start(tmp_path):
    """The full no-argument run (~1 minute on 2 cores): from the paper's scale of 1e-6 the scale rises to an active
    blend (measured 0.67 for this seed, 0.11-0.14 for seeds 1-2) and SM lowers the held-out loss of the trained model
    (measured by 0.040 nats)."""
    summary = main(["--output-dir", str(tmp_path)])
    assert summary["soft_mask"]["transparency_scale"] >= 0.1
    assert summary["val_soft_mask"] <= summary["val_binary"] - 0.01
