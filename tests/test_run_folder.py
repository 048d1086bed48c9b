"""One writer and one run per --out: the lock, the refusal of a folder holding another run, --overwrite, verified
explicit resumes, truthful NaN messages and skipped malformed checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kitelm.checkpoint import list_checkpoints
from kitelm.cli import main
from kitelm.errors import KitelmError
from kitelm.presets import get_preset
from kitelm.train.run_folder import RunLock
from kitelm.train.trainer import TrainConfig, Trainer, TrainingDiverged


def _config(corpus_dir, out, **kw):
    options = dict(out_dir=str(out), data=str(corpus_dir), steps=4, batch_size=4, seq_len=32, warmup_steps=1,
                   eval_every=2, eval_tokens=256, save_every=2, log_every=1)
    return TrainConfig(**{**options, **kw})


def test_a_second_writer_is_refused_with_the_holders_pid(corpus_dir, tmp_path):
    first = Trainer(get_preset("transformer-tiny"), _config(corpus_dir, tmp_path))
    try:
        with pytest.raises(KitelmError, match=f"in use by another kitelm training run \\(pid {os.getpid()} "):
            Trainer(get_preset("transformer-tiny"), _config(corpus_dir, tmp_path), resume="auto")
    finally:
        first.release()
    Trainer(get_preset("transformer-tiny"), _config(corpus_dir, tmp_path), resume="auto").release()  # free again


def test_a_lock_left_by_a_killed_process_is_taken_over(corpus_dir, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from kitelm.train.run_folder import RunLock; lock = RunLock(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(60)", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(KitelmError, match=f"pid {holder.pid}"):
            RunLock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert f"pid {holder.pid}" in (tmp_path / ".lock").read_text()  # the stale pid is still written there
    lock = RunLock(tmp_path)  # ... and the kernel released the lock with the process
    assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()
    lock.release()


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(corpus_dir, tmp_path):
    first = Trainer(get_preset("transformer-tiny"), _config(corpus_dir, tmp_path, steps=4))
    first.train()
    first.release()
    with pytest.raises(KitelmError, match="already holds a run \\(checkpoints up to step 4\\); pass --resume auto"):
        Trainer(get_preset("transformer-tiny"), _config(corpus_dir, tmp_path, steps=2))
    second = Trainer(get_preset("transformer-tiny"), _config(corpus_dir, tmp_path, steps=2, save_every=1),
                     overwrite=True)
    result = second.train()
    second.release()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]
    assert result["checkpoint"].endswith("step-00000002")
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2  # no rows of the replaced 4-step run


def test_explicit_resume_verifies_the_checkpoint(corpus_dir, tmp_path):
    run = Trainer(get_preset("transformer-tiny"), _config(corpus_dir, tmp_path / "a"))
    run.train()
    run.release()
    ckpt = list_checkpoints(tmp_path / "a")[-1]
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(KitelmError, match="checksum mismatch"):
        Trainer(get_preset("transformer-tiny"), _config(corpus_dir, tmp_path / "b"), resume=str(ckpt))


def test_resume_auto_skips_a_malformed_manifest_with_a_one_line_warning(corpus_dir, tmp_path, capsys):
    args = ["train", "--data", str(corpus_dir), "--out", str(tmp_path), "--model", "transformer-tiny", "--steps",
            "4", "--batch-size", "4", "--seq-len", "32", "--save-every", "2", "--eval-every", "2",
            "--eval-tokens", "256", "--final-eval-tokens", "256", "--no-sample"]
    assert main(args) == 0
    (list_checkpoints(tmp_path)[-1] / "manifest.json").write_text("[]")
    capsys.readouterr()
    assert main(args + ["--resume", "auto"]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if "skipping checkpoint" in line]
    assert warning and warning[0].startswith("kitelm: warning: skipping checkpoint") and "warnings.warn" not in captured.err
    assert "resumed from" in captured.out and "step-00000002" in captured.out


@pytest.mark.parametrize("save_every, expected", [(100, "No checkpoint was saved yet"),
                                                  (1, "The last good checkpoint, .*step-00000001, is intact")])
def test_a_nan_loss_says_truthfully_whether_a_checkpoint_exists(corpus_dir, tmp_path, monkeypatch, save_every,
                                                                expected):
    trainer = Trainer(get_preset("transformer-tiny"), _config(corpus_dir, tmp_path, save_every=save_every,
                                                                eval_every=100))
    real = trainer.forward_backward
    monkeypatch.setattr(trainer, "forward_backward",
                        lambda *a, **kw: float("nan") if trainer.step == 1 else real(*a, **kw))
    with pytest.raises(TrainingDiverged, match=f"loss became nan at step 2.*{expected}"):
        trainer.train()
    trainer.release()


def test_the_tokenizer_says_when_the_corpus_gives_fewer_tokens_than_asked(corpus_dir, tmp_path):
    lines = []
    Trainer(get_preset("transformer-tiny"), _config(corpus_dir, tmp_path, tokenizer="bpe:60000"),
            log=lines.append).release()
    assert any("not the 60,000 requested" in line for line in lines)


def test_command_line_help_does_not_import_torch():
    code = "import sys, kitelm.cli; kitelm.cli.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
