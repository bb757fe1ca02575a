"""`python -m softmask_ext.generate`: chat template, final text on stdout, live view, soft-mask configs, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _training_helpers import make_model_dir

from softmask_ext import SoftMask, generate
from softmask_ext.decoding import diffusion_generate
from softmask_ext.model import DreamModel, load_tokenizer

ARGS = ["--max-new-tokens", "12", "--steps", "4", "--temperature", "0", "--device", "cpu"]
SM_CONFIG = {"transparency_scale": 0.9, "transparency_centre": -5.0, "transparency_steepness": 1.0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("ckpt"))


def expected_text(model_dir, prompt, soft_mask=None):
    tokenizer = load_tokenizer(model_dir)
    model = DreamModel.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    out = diffusion_generate(
        model,
        torch.tensor([ids]),
        max_new_tokens=12,
        steps=4,
        temperature=0.0,
        top_p=0.95,
        alg="entropy",
        soft_mask=soft_mask,
    )
    return generate.final_text(tokenizer, out[0, len(ids) :].tolist()), tokenizer.decode(ids)


def test_prints_the_answer_of_a_chat_prompt(model_dir, capsys):
    assert generate.main(["--model", str(model_dir), "--prompt", "def add(a, b):", *ARGS]) == 0
    text, rendered_prompt = expected_text(model_dir, "def add(a, b):")
    assert "<|im_start|>" in rendered_prompt  # the chat template was applied
    assert capsys.readouterr().out == text + "\n"


def test_prompt_file_and_soft_mask_config(model_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("class Point:")
    config = SoftMask.from_any(SM_CONFIG).save_transparency_config(tmp_path / "sm.json")
    generate.main(["--model", str(model_dir), "--prompt-file", str(prompt), "--soft-mask", config, *ARGS])
    assert capsys.readouterr().out == expected_text(model_dir, "class Point:", SM_CONFIG)[0] + "\n"


def test_config_beside_the_weights_is_used_unless_binary(model_dir, capsys):
    SoftMask.from_any(SM_CONFIG).save_transparency_config(model_dir)
    try:
        generate.main(["--model", str(model_dir), "--prompt", "for i in", *ARGS])
        captured = capsys.readouterr()
        assert "using the soft-mask config" in captured.err
        assert captured.out == expected_text(model_dir, "for i in", SM_CONFIG)[0] + "\n"
        generate.main(["--model", str(model_dir), "--prompt", "for i in", "--binary", *ARGS])
        assert capsys.readouterr().out == expected_text(model_dir, "for i in")[0] + "\n"
    finally:
        (model_dir / "transparency_config.json").unlink()


def test_live_view_shows_every_step(model_dir, capsys):
    generate.main(["--model", str(model_dir), "--prompt", "import os", "--live", *ARGS])
    err = capsys.readouterr().err
    frames = err.split("--- step ")[1:]
    assert [f.split("/")[0] for f in frames] == ["0", "1", "2", "3", "4"]
    assert frames[0].split("---\n")[1].strip() == generate.MASK_GLYPH * 12
    assert generate.MASK_GLYPH not in frames[-1]


def test_mask_tokens_in_the_prompt_are_filled_in(model_dir, capsys):
    """Infilling from the command line: the text from the first mask on, as the library decodes it."""
    prompt = "def add(a, b):\n    <|mask|><|mask|><|mask|><|mask|>\n"
    argv = [
        "--model",
        str(model_dir),
        "--prompt",
        prompt,
        "--no-chat-template",
        "--max-new-tokens",
        "0",
        "--temperature",
        "0",
        "--device",
        "cpu",
    ]
    generate.main([*argv, "--live"])
    tokenizer, model = load_tokenizer(model_dir), DreamModel.from_pretrained(model_dir)
    ids = tokenizer(prompt)["input_ids"]
    start = ids.index(model.config.mask_token_id)
    out = diffusion_generate(model, torch.tensor([ids]), max_new_tokens=0, temperature=0.0, top_p=0.95, alg="entropy")
    captured = capsys.readouterr()
    assert captured.out == generate.final_text(tokenizer, out[0, start:].tolist()) + "\n"
    frames = captured.err.split("--- step ")[1:]
    assert len(frames) == 5 and frames[0].split("---\n")[1].startswith(generate.MASK_GLYPH * 4)


def test_render_marks_masks():
    class Chars:
        def decode(self, ids, **kw):
            return "".join(chr(97 + i) for i in ids)

    assert generate.render(Chars(), [0, 1, 9, 9, 2], mask_token_id=9) == "ab" + generate.MASK_GLYPH * 2 + "c"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--prompt", "x", "--max-new-tokens", "0", "--device", "cpu"], "nothing to decode"),
        (["--prompt-file", "/no/such/file", "--device", "cpu"], "cannot read --prompt-file"),
        (["--prompt", "x", "--soft-mask", "/no/such.json", "--device", "cpu"], "no transparency config"),
    ],
)
def test_errors_are_messages(model_dir, argv, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        generate.main(["--model", str(model_dir), *argv])


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="not a checkpoint directory"):
        generate.main(["--model", str(tmp_path), "--prompt", "x"])


def test_missing_tiny_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(generate, "SHIPPED_MODEL", tmp_path / "tiny-coder")
    with pytest.raises(SystemExit, match="the shipped tiny model is missing"):
        generate.main(["--prompt", "x"])


@pytest.mark.skipif(not (generate.SHIPPED_MODEL / "config.json").is_file(), reason="tiny model asset not shipped yet")
def test_runs_as_a_module_with_the_shipped_model():
    result = subprocess.run(
        [sys.executable, "-m", "softmask_ext.generate", "--prompt", "def add(a, b):", *ARGS],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")
