"""Training: loss goes down, checkpoints are bit-exact and atomic, resume reproduces an uninterrupted run."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from kitelm.presets import get_preset
from kitelm.errors import CheckpointError
from kitelm.checkpoint import latest_checkpoint, list_checkpoints, load_weights, verify_checkpoint
from kitelm.train.schedule import lr_at
from kitelm.train.trainer import TrainConfig, Trainer, TrainingDiverged


def make_trainer(corpus_dir, out, steps=12, resume=None, **kw):
    tc = TrainConfig(out_dir=str(out), data=str(corpus_dir), steps=steps, batch_size=4, seq_len=32, lr=3e-3,
                     warmup_steps=2, eval_every=6, eval_tokens=512, save_every=4, log_every=2, **kw)
    return Trainer(get_preset("transformer-tiny"), tc, resume=resume)


def test_tiny_run_lowers_the_loss(corpus_dir, tmp_path):
    trainer = make_trainer(corpus_dir, tmp_path, steps=30)
    before = trainer.validate()
    trainer.train()
    assert trainer.validate() < before - 0.5
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 30 and any("val_loss" in r for r in rows)
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_checkpoint_round_trip_is_bit_exact(corpus_dir, tmp_path):
    trainer = make_trainer(corpus_dir, tmp_path, steps=4)
    trainer.train()
    path = latest_checkpoint(tmp_path)
    saved = load_file(path / "model.safetensors")
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(saved[name], tensor)
    fresh = make_trainer(corpus_dir, tmp_path / "other", steps=4).model
    load_weights(fresh, path)
    for a, b in zip(fresh.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)


def test_resume_reproduces_an_uninterrupted_run_bitwise(corpus_dir, tmp_path):
    straight = make_trainer(corpus_dir, tmp_path / "a", steps=12)
    straight.train()
    make_trainer(corpus_dir, tmp_path / "b", steps=12).train(until=8)  # as if killed after the step-8 checkpoint
    resumed = make_trainer(corpus_dir, tmp_path / "b", steps=12, resume="auto")
    assert resumed.step == 8
    resumed.train()
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_keep_last_rotation_and_corrupt_checkpoint_fallback(corpus_dir, tmp_path):
    trainer = make_trainer(corpus_dir, tmp_path, steps=12, keep_last=2)
    trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000008", "step-00000012"]
    newest = list_checkpoints(tmp_path)[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncate
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        verify_checkpoint(newest.parent)
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert latest_checkpoint(tmp_path).name == "step-00000008"
    with pytest.warns(UserWarning):
        resumed = make_trainer(corpus_dir, tmp_path, steps=12, resume="auto")
    assert resumed.step == 8


def test_resume_refuses_a_different_model(corpus_dir, tmp_path):
    make_trainer(corpus_dir, tmp_path, steps=4).train()
    tc = TrainConfig(out_dir=str(tmp_path), data=str(corpus_dir), steps=8, batch_size=4, seq_len=32)
    with pytest.raises(CheckpointError, match="different model"):
        Trainer(get_preset("transformer-tiny").replace(n_layers=3), tc, resume="auto")


def test_nan_loss_stops_with_last_checkpoint_intact(corpus_dir, tmp_path):
    trainer = make_trainer(corpus_dir, tmp_path, steps=12)
    trainer.train(until=4)
    good = latest_checkpoint(tmp_path)
    manifest = (good / "manifest.json").read_text()
    with torch.no_grad():
        trainer.model.embed.weight[5] = float("nan")
    with pytest.raises(TrainingDiverged, match="loss became nan"):
        trainer.train()
    verify_checkpoint(good)
    assert (good / "manifest.json").read_text() == manifest and latest_checkpoint(tmp_path) == good


def test_unwritable_checkpoint_folder_keeps_the_previous_one(corpus_dir, tmp_path):
    trainer = make_trainer(corpus_dir, tmp_path, steps=8)
    trainer.train(until=4)
    good = latest_checkpoint(tmp_path)
    blocker = tmp_path / "checkpoints" / f".tmp-step-00000008-{__import__('os').getpid()}"
    blocker.write_text("a file where the temporary folder should go")
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        trainer.train()
    verify_checkpoint(good)
    blocker.unlink()
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000008", ignore_errors=True)


def test_schedule_warmup_and_decay():
    lrs = [lr_at(s, 1.0, 100, 10, "cosine", 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_at(55, 1.0, 100, 10, "linear", 0.0) == pytest.approx(0.5)
