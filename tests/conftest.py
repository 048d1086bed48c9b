"""Shared fixtures: a small text corpus made in a temporary folder, and an isolated kitelm cache."""

from __future__ import annotations

import random
import textwrap

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KITELM_CACHE", str(tmp_path_factory.getbasetemp() / "kitelm-cache"))
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _float32_by_default():
    """`--dtype auto` means float32 in tests, on every CPU, module-scoped fixtures included: their tolerances are
    derived for fp32 rounding. Tests of the bf16 paths ask for bfloat16 explicitly; tests of the auto choice restore
    `native_bf16` and mock the CPU flags themselves. (Subprocesses do not see this: they pass --dtype themselves.)"""
    from kitelm import precision

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision, "native_bf16", lambda device="cpu": False)
        yield


def _python_like_text(seed: int, n_functions: int) -> str:
    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "value", "count", "items", "total", "index", "result"]
    out = []
    for i in range(n_functions):
        a, b = rng.sample(names, 2)
        out.append(textwrap.dedent(f'''
            def {a}_{i}({a}, {b}=None):
                """Return the {a} of {b}."""
                if {b} is None:
                    {b} = []
                for {a}_item in {b}:
                    {a} += {a}_item * {rng.randint(1, 9)}
                return {a}
            '''))
    return "".join(out)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A folder of small Python-like files (~60 KB): at least 24, two of which hash to the validation split."""
    from kitelm.data.corpus import is_validation

    folder = tmp_path_factory.mktemp("corpus")
    i = n_val = 0
    while i < 24 or n_val < 2:
        name = f"module_{i:02d}.py"
        (folder / name).write_text(_python_like_text(i, 20))
        n_val += is_validation(name)
        i += 1
    return folder
