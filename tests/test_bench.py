"""`kitelm bench` pieces that are correctness, not speed: input checks before any work, and peak-RSS accounting.
(The experiments themselves run at tiny scale in test_reproduce.py; no timing is asserted anywhere.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from kitelm.experiments.bench import run_bench
from kitelm.experiments.settings import BenchSettings
from kitelm.errors import KitelmError


def test_unknown_benchmarks_and_impossible_sizes_fail_before_any_work(tmp_path):
    with pytest.raises(KitelmError, match=r"unknown benchmark\(s\) \['speed'\]; choose from"):
        run_bench(["speed"], tmp_path, BenchSettings())
    with pytest.raises(KitelmError, match="KV cache of transformer-small needs .* GiB, more than this machine's"):
        run_bench(["memory"], tmp_path, BenchSettings(memory_lengths=[1 << 30]))
    assert not any(tmp_path.iterdir())


def test_a_childs_peak_rss_is_its_own_not_its_parents():
    """getrusage's ru_maxrss is inherited through vfork + exec: a child of a process that once held 1.5 GiB reported
    1.5 GiB whatever it did (every point of the first `bench memory` runs read the same value)."""
    code = ("import torch; from kitelm.experiments.bench.memory import _peak_rss_child; "
            "big = torch.ones(3 << 27); del big; print(_peak_rss_child('transformer-tiny', 16))")
    parent_peak = 3 << 29  # 1.5 GiB of float32 ones, touched
    child_peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                     .stdout.split()[-1])
    assert 50 << 20 < child_peak < parent_peak // 2  # a Python with torch and a tiny model: a few hundred MiB


def test_decode_bench_builds_the_transformers_peer_in_the_dtype_asked(monkeypatch):
    """The peer row is transformers' model at the preset's sizes, built in the dtype asked (no fp32 copy for bf16),
    with the same fields as kitelm's rows; torch's default dtype is restored. Its timings are not checked."""
    pytest.importorskip("transformers")
    import torch

    from kitelm.experiments.bench import decode
    from kitelm.experiments.bench.decode import build_peer, measure_peer

    monkeypatch.setattr(decode, "read_bandwidth", lambda: 1e10)  # a measurement (seconds of DRAM reads), not tested

    for dtype, want in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        name, model = build_peer("griffin-tiny", dtype)
        assert name == "transformers RecurrentGemma" and {p.dtype for p in model.parameters()} == {want}
        assert torch.get_default_dtype() == torch.float32
    row = measure_peer("griffin-tiny", "fp32", steps=3)
    assert row["weights"] == "transformers RecurrentGemma fp32"
    assert {"ms_per_token", "ms_per_token_median", "floor_ms", "of_floor", "stored_GB", "peak_rss_GB"} <= set(row)


@pytest.mark.parametrize("flags, peers", [([], True), (["--no-peers"], False)])
def test_bench_no_peers_measures_kitelm_only(flags, peers, tmp_path, monkeypatch):
    """`--no-peers` reaches the settings every experiment reads (a 9B run must not build transformers' copy)."""
    from kitelm import cli
    from kitelm.experiments import bench

    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda names, out, settings: seen.update(names=names, peers=settings.peers))
    assert cli.main(["bench", "decode", "--out", str(tmp_path / "r"), *flags]) == 0
    assert seen == {"names": ["decode"], "peers": peers}


def test_stored_bytes_count_a_tied_matrix_once():
    """transformers lists a tied head under two state-dict names; the byte floor must read it once."""
    from torch import nn

    from kitelm.experiments.bench.decode import stored_bytes

    embed, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    assert stored_bytes(nn.ModuleDict({"embed": embed, "head": head})) == 10 * 4 * 4
    assert stored_bytes(nn.ModuleDict({"a": nn.Linear(4, 10, bias=False), "b": nn.Linear(4, 10, bias=False)})) == 320
