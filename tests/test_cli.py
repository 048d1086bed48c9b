"""The command line: the happy path on a tiny fixture (bad input: tests/test_bad_input.py)."""

import subprocess
import sys

import pytest

from kitelm.cli import main

TINY = ["--model", "transformer-tiny", "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--eval-every", "3",
        "--save-every", "3", "--eval-tokens", "256", "--final-eval-tokens", "512"]


@pytest.fixture(scope="module")
def trained(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--data", str(corpus_dir), "--out", str(out), *TINY]) == 0
    return out


def test_train_reports_bits_per_byte_beside_compressors(corpus_dir, tmp_path, capsys):
    assert main(["train", "--data", str(corpus_dir), "--out", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr().out
    assert "bits/byte | gzip -9" in out and "xz -9" in out and "sample" in out
    assert "xz -9 given the training split" in out and "validation, whole split," in out  # 512 tokens of more
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "loss.png").exists()


def test_generate_streams_text(trained, capsys):
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "def f(", "--max-new-tokens", "20",
                 "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("def f(")


def test_generate_batched_prompts(trained, capsys):
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "def a", "import os", "x",
                 "--max-new-tokens", "8", "--greedy"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- [") == 3


def test_resume_auto_picks_up_the_newest_checkpoint(corpus_dir, tmp_path, capsys):
    args = ["train", "--data", str(corpus_dir), "--out", str(tmp_path), *TINY, "--no-sample"]
    assert main(args) == 0
    assert main(args + ["--resume", "auto"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_presets_lists_parameter_counts(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "transformer-small" in out and "non-embedding" in out


def test_python_dash_m_works():
    result = subprocess.run([sys.executable, "-m", "kitelm", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kitelm: error:") and "Traceback" not in err
    return lines[0]


def test_corrupt_checkpoint_is_reported_and_not_modified(trained, capsys):
    from kitelm.checkpoint import list_checkpoints

    ckpt = list_checkpoints(trained)[-1]
    model = ckpt / "model.safetensors"
    original = model.read_bytes()
    model.write_bytes(original[: len(original) // 2])
    try:
        assert "truncated or corrupt" in _error(capsys, ["generate", "--checkpoint", str(ckpt), "--prompt", "x"])
        assert len(model.read_bytes()) == len(original) // 2  # reported, never "repaired" or deleted
    finally:
        model.write_bytes(original)


def test_eval_reports_loss_by_position(trained, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(trained), "--windows", "2", "--max-tokens", "256",
                 "--extrapolate", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bits/byte | gzip -9" in out and "0-1×" in out and "1-2×" in out
    result = __import__("json").loads((tmp_path / "eval.json").read_text())
    assert len(result["loss_by_position"]) == 2 * result["train_len"] == 64
    assert (tmp_path / "loss_by_position.png").exists()
