"""Test tolerances derived from float32 rounding, so that they hold on any CPU and any kernel choice.

Two float32 computations of one quantity that differ only in how their sums are ordered and blocked (another BLAS
kernel, another ISA, another thread split, a fused kernel vs the torch ops) differ by their rounding errors. For a
sum of n terms each rounding error is at most u = 2^-24 relative, and with errors of random sign their total stays
below λ·√n·u times the sum of the terms' magnitudes with probability at least 1 − 2·exp(−λ²/2) (Higham & Mary, "A
new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019, Theorem 2.4). A chain of
`depth` such reductions (layers; the forward and then the backward) is treated as one sum of terms × depth terms;
two independent evaluations add a factor √2. With λ = 8 a bound fails with probability below 3·10⁻¹⁴ per element,
while a real bug (a wrong mask, a missing term, an off-by-one position) moves outputs by orders of magnitude more.

The worst-case bound (n·u instead of √n·u) would also hold but is too loose to catch small bugs at depth.
"""

from __future__ import annotations

import math

import torch

FP32_U = 2.0**-24  # float32 unit roundoff (24-bit significand)
LAMBDA = 8.0  # the probabilistic bound's confidence parameter: failure probability ≤ 2·exp(−λ²/2) ≈ 2.5e-14


def fp32_tolerance(terms: int, depth: int = 1) -> float:
    """Relative bound on |a − b| for two fp32 evaluations of `depth` chained reductions of ≤ `terms` terms each."""
    return LAMBDA * math.sqrt(2 * terms * depth) * FP32_U


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, terms: int, depth: int = 1,
                      scale: float | None = None, name: str = "") -> None:
    """max |actual − expected| ≤ fp32_tolerance(terms, depth) · scale. `scale` is the magnitude of the terms summed:
    by default max |expected|, at least 1 (the activations of normalised layers are O(1) whatever the output's size)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shapes {tuple(actual.shape)} vs {tuple(expected.shape)}"
    if scale is None:
        scale = max(expected.abs().max().item(), 1.0)
    bound = fp32_tolerance(terms, depth) * scale
    error = (actual - expected).abs().max().item()
    assert error <= bound, (f"{name}: max error {error:.3g} exceeds the fp32 bound {bound:.3g} "
                            f"({terms} terms × depth {depth} × scale {scale:.3g})")


def model_reductions(config, seq_len: int) -> tuple[int, int]:
    """(terms, depth) of a model's forward: the longest reduction of a layer (width, MLP hidden, RG-LRU width or the
    keys one query attends to) and ~6 chained reductions per layer (norm, input projections, attention or scan, output
    projection, the MLP's two) plus the embedding scale and the head."""
    terms = max(config.width, config.mlp_width, config.lru_width or 0, seq_len)
    return terms, 6 * config.n_layers + 2


def matmul_bound(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise worst-case bound on the difference of two fp32 evaluations of x wᵀ + b: each is within
    γ_(K+1) ≈ (K+1)·u of the exact value relative to |x| |w|ᵀ + |b| (Higham 2002, §3.1), so they are within twice that.
    Cheap and tight enough for one product; chains use the probabilistic bound above."""
    k = x.shape[-1] + 1
    magnitude = x.double().abs() @ w.double().abs().t()
    if b is not None:
        magnitude = magnitude + b.double().abs()
    return 2 * k * FP32_U * magnitude
