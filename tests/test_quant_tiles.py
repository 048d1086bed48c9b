"""The GEMM path of quantized layers (more than 8 rows of x): the tile dequantizer (csrc/dequant_kernels.cpp) on
every ISA path this CPU runs, bit for bit against the twin `dequantize_reference` (fp32 tiles) and its bf16 rounding
(bf16 tiles: the product q·s is exact in fp32, so the only rounding is the one to bf16, done the same way); and the
tiled linear against the twin within the derived bounds (tests/test_quant.py states them)."""

from __future__ import annotations

import pytest
import torch

from kitelm.ops import quant as Q

DQ = Q._dequant_kernels()
ISAS = [name for name, level in Q.DEQUANT_ISAS.items() if DQ is not None and level <= DQ.best_isa()]
# int8: per channel with odd widths and groups of 7 / 91 (portable path inside the vector ISAs), 16/32/64; int4: 32-128
CASES = [("int8", 91, 91), ("int8", 91, 7), ("int8", 160, 16), ("int8", 96, 32), ("int8", 256, 256), ("int8", 192, 64),
         ("int8", 2560, 32), ("int4", 96, 32), ("int4", 160, 32), ("int4", 256, 64), ("int4", 384, 128),
         ("int4", 2560, 64)]


def _storage(fmt, inp, group, out=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[0] = 0.0
    w[1] *= 1e-36  # scales near the bottom of the normal range: products that round to bf16 subnormals / zero
    return Q.quantize(w, fmt, group)


@pytest.fixture
def dq():
    if DQ is None:
        pytest.skip("the C++ dequantization kernels did not build")
    return DQ


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,inp,group", CASES)
def test_tile_dequantizer_is_bit_exact_on_every_isa(dq, isa, fmt, inp, group):
    storage, scales = _storage(fmt, inp, group)
    ref = Q.dequantize_reference(storage, scales, fmt, group)
    for dtype in (torch.float32, torch.bfloat16):
        for r0, r1 in ((0, 53), (5, 6), (17, 50)):  # row slices of the storage, as the tiles take them
            tile = torch.full((r1 - r0, inp), 7.0, dtype=dtype)
            dq.dequantize_into(storage[r0:r1], scales[r0:r1], group, fmt == "int4", tile, Q.DEQUANT_ISAS[isa])
            assert torch.equal(tile, ref[r0:r1].to(dtype)), (isa, dtype, r0, r1)


@pytest.mark.parametrize("isa", ISAS)
def test_tile_dequantizer_keeps_special_scales(dq, isa):
    """inf / NaN / subnormal scales (corrupt or extreme storage) give what the twin gives: inf·0 = NaN, NaN stays a
    quiet NaN in bf16, subnormal products round as c10::BFloat16 rounds them."""
    for fmt, group in (("int8", 32), ("int4", 32)):
        storage, scales = _storage(fmt, 64, group, out=4)
        scales[0, 0] = float("inf")
        scales[1, 1] = float("nan")
        scales[2, 0] = torch.tensor(1e-39).to(torch.bfloat16)
        scales[3, 1] = -scales[3, 1]
        ref = Q.dequantize_reference(storage, scales, fmt, group)
        for dtype in (torch.float32, torch.bfloat16):
            tile = torch.empty(4, 64, dtype=dtype)
            dq.dequantize_into(storage, scales, group, fmt == "int4", tile, Q.DEQUANT_ISAS[isa])
            want = ref.to(dtype)
            assert torch.equal(tile.isnan(), want.isnan())
            assert torch.equal(torch.nan_to_num(tile), torch.nan_to_num(want)), (fmt, isa, dtype)


def test_tile_dequantizer_checks_its_arguments(dq):
    storage, scales = _storage("int8", 64, 32, out=4)
    with pytest.raises(RuntimeError, match="do not match"):
        dq.dequantize_into(storage, scales, 32, False, torch.empty(3, 64), 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        dq.dequantize_into(storage, scales, 32, False, torch.empty(64, 4).T, 0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_tiled_linear_matches_the_twin(isa, fmt, monkeypatch):
    """Several tiles (the last one partial) of a reused buffer; fp32 and bf16 compute. Bounds as in test_quant.py's
    `test_gemm_path_above_eight_rows_matches_the_twin`: fp32 reordering, plus bf16 rounding of x, Ŵ and y."""
    from test_quant import fp32_reorder_bound  # noqa: PLC0415 (the shared bound)

    monkeypatch.setenv("KITELM_QUANT_ISA", isa)
    inp, group = 256, {"bf16": 0, "int8": 32, "int4": 64}[fmt]
    g = torch.Generator().manual_seed(3)
    storage, scales = Q.quantize(torch.randn(301, inp, generator=g) * 0.05, fmt, group)
    bias = torch.randn(301, generator=g)
    monkeypatch.setattr(Q, "TILE_ELEMENTS", 64 * inp)
    x = torch.randn(3, 7, inp, generator=g)
    w_hat = Q.dequantize_reference(storage, scales, fmt, group)
    ref = Q.linear_reference(x, storage, scales, bias, fmt, group)
    for compute in (torch.float32, torch.bfloat16):
        monkeypatch.setattr(Q, "gemm_dtype", lambda x, c=compute: c)
        with torch.inference_mode():
            y = Q.quantized_linear(x, storage, scales, bias, fmt, group)
        assert y.shape == ref.shape and y.dtype == torch.float32 and y.is_contiguous()
        bound = fp32_reorder_bound(x, w_hat, bias)
        if compute == torch.bfloat16:
            ub = 2.0**-8
            bound = bound + (2 * ub + ub * ub) * (x.abs().double() @ w_hat.abs().double().T) \
                + ub * (ref - bias).abs().double()
        assert ((y - ref).abs().double() <= bound).all(), (fmt, compute)
