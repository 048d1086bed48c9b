"""Quantized weights: every kernel against its pure-torch twin (dequantize + F.linear) on random inputs including odd
sizes and every ISA path this CPU runs; the quantization error bound; quantized models against fp32; quantize → save
→ load bit-exact; `kitelm quantize` / `kitelm convert --weights` and their one-line errors for bad input.

Tolerances come from the arithmetic, not from fitting:
* kernel vs twin: both sum the same exact products ŵ·x in fp32 in different orders, so each is within γ_n·Σ|ŵ·x| of
  the exact sum (γ_n = n·u/(1 − n·u), u = 2⁻²⁴, n = in + 2: the bias and a per-block scale multiply): they differ
  by at most 2·γ_n·Σ|ŵ·x|. With int8 x the exact sum is Σ_blocks D·s_x·s_w, D = Σ q·x_q an exact integer in both
  (the twin's block dots are the kernel's); each block term takes two roundings (·s_x, ·s_w), so the same bound holds
  with x replaced by x̂ = x_q·s_x (Σ|D|·s_x·s_w ≤ Σ|ŵ·x̂|).
* quantization: |w − ŵ| ≤ s/2 per weight, so a layer's output moves by at most Σ_i |x_i|·s_i/2 (+ the fp32 bound);
  int8 x adds Σ_i |x_i − x̂_i|·|ŵ_i|, with |x − x̂| ≤ s_x/2 + amax·2⁻⁹ (bf16 may round s_x down by 2⁻⁹ relative).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from kitelm import precision
from kitelm.cli import main
from kitelm.errors import CheckpointError, ConfigError, KitelmError
from kitelm.models import build_model
from kitelm.ops import quant as Q
from kitelm.presets import get_preset
from kitelm.quant import QuantSpec, QuantizedLinear, is_quantized, load_quantized, quantize_checkpoint, quantize_model
from kitelm.quant.checkpoint import read_safetensors_mmap

U = 2.0**-24
ISAS = Q.available_isas()
# (format, in, group): odd output counts below; int8 per channel with an odd width, a group that is no power of two
# (the portable path), and groups 16/32/64 for int4/int8
# (int8 x: widths and groups that are multiples of 32, incl. rows that end in part of a vector and groups of 96 that
# take the portable path; fp32 x: the rest)
CASES = [("bf16", 91, 0), ("bf16", 160, 0), ("int8", 91, 91), ("int8", 96, 32), ("int8", 160, 16), ("int8", 91, 7),
         ("int8", 256, 256), ("int8", 192, 64), ("int8", 192, 96), ("int4", 96, 32), ("int4", 160, 32),
         ("int4", 256, 64), ("int4", 384, 128), ("int4", 192, 96)]


def fp32_reorder_bound(x: torch.Tensor, w_hat: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n = x.shape[-1] + 2  # the products, the bias and (int4 on avx512bf16) the per-block scale multiply
    gamma = n * U / (1 - n * U)
    mass = x.abs().double() @ w_hat.abs().double().T + (0 if bias is None else bias.abs().double())
    return 2 * gamma * mass + 1e-30


def make(fmt: str, inp: int, group: int, out: int = 37, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[0, :] = 0.0  # an all-zero row (and so all-zero groups)
    storage, scales = Q.quantize(w, fmt, group)
    return w, storage, scales, torch.randn(out, generator=g)


def x_hat(x: torch.Tensor) -> torch.Tensor:
    """x as the int8-x kernels see it: x_q·s_x."""
    q, s = Q.quantize_activations(x)
    return (q.float().reshape(*x.shape[:-1], -1, Q.X_BLOCK) * s[..., None]).reshape(x.shape)


def check_gemv(fmt, inp, group, storage, scales, bias, rows_list=range(1, 9), scale=1.0):
    """Kernel (the ISA and x format set in the environment) against the twin that `quantizes_x` names."""
    w_hat = Q.dequantize_reference(storage, scales, fmt, group)
    x_int8 = Q.quantizes_x(fmt, inp, group)
    for rows in rows_list:
        for b in (bias, None):
            x = torch.randn(rows, inp) * scale
            ref = Q.linear_reference(x, storage, scales, b, fmt, group, x_int8=x_int8)
            with torch.inference_mode():
                y = Q.quantized_linear(x, storage, scales, b, fmt, group)
            assert y.shape == ref.shape and y.dtype == torch.float32
            bound = fp32_reorder_bound(x_hat(x) if x_int8 else x, w_hat, b)
            assert ((y - ref).abs().double() <= bound).all(), (rows, fmt, inp, group)


@pytest.fixture
def kernels():
    kernels = Q._kernels()
    if kernels is None:
        pytest.skip("the C++ quant kernels did not build")
    return kernels


@pytest.mark.parametrize("x_format", Q.X_FORMATS)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,inp,group", CASES)
def test_gemv_kernels_match_their_twin(kernels, isa, fmt, inp, group, x_format, monkeypatch):
    if fmt == "bf16" and x_format == "fp32":
        pytest.skip("bf16 weights always take fp32 x")
    monkeypatch.setenv("KITELM_QUANT_ISA", isa)
    monkeypatch.setenv("KITELM_QUANT_X", x_format)
    assert Q.quantizes_x(fmt, inp, group) == (x_format == "int8" and fmt != "bf16" and inp % 32 == 0
                                                and group % 32 == 0)
    _, storage, scales, bias = make(fmt, inp, group)
    check_gemv(fmt, inp, group, storage, scales, bias)


@pytest.mark.parametrize("fmt,inp,group", [("int8", 96, 32), ("int8", 91, 7), ("int4", 256, 64)])
def test_int_weights_take_the_gemv_in_calls_of_eight_rows_up_to_sixteen(kernels, fmt, inp, group, monkeypatch):
    """9-16 rows of x against int8/int4 weights: GEMV calls of ≤ 8 rows (the GEMV twin holds), not the tiled GEMM
    (which is never called); 17 rows take the tiles, and so do bf16 weights above 8 rows where bf16 is native."""
    _, storage, scales, bias = make(fmt, inp, group)
    tiled = []
    real_tiled = Q._tiled_linear
    monkeypatch.setattr(Q, "_tiled_linear", lambda *args: tiled.append(args[0].shape) or real_tiled(*args))
    check_gemv(fmt, inp, group, storage, scales, bias, rows_list=(9, 13, 16))
    assert tiled == [] and Q.gemv_rows(fmt) == 16
    assert Q.gemv_rows("bf16") == 16  # conftest: no native bf16, so the tiles would be converted to fp32
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": True)
    assert Q.gemv_rows("bf16") == Q.MAX_ROWS and Q.gemv_rows(fmt) == 16
    with torch.inference_mode():
        Q.quantized_linear(torch.randn(17, inp), storage, scales, bias, fmt, group)
    assert len(tiled) == 1


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,inp,group", [("bf16", 256, 0), ("int8", 256, 32), ("int4", 512, 64)])
def test_gemv_splits_output_rows_across_threads(kernels, isa, fmt, inp, group, monkeypatch):
    """≥ 2 tasks of ≥ 1 MiB of weights each (the kernels' grain), large activations, every row count."""
    monkeypatch.setenv("KITELM_QUANT_ISA", isa)
    _, storage, scales, bias = make(fmt, inp, group, out=4500)
    check_gemv(fmt, inp, group, storage, scales, bias, rows_list=(1, 4, 8) if isa == "portable" else range(1, 9),
               scale=1e3)


def test_twin_with_int8_x_sums_the_dequantized_products():
    """The twin's block bookkeeping (scales per block, nibble order) against F.linear of x̂ and Ŵ: both approximate
    the same exact sum Σ x̂·ŵ."""
    for fmt, inp, group in [("int8", 192, 64), ("int4", 384, 128), ("int8", 256, 256), ("int4", 192, 96)]:
        _, storage, scales, bias = make(fmt, inp, group)
        x = torch.randn(5, inp)
        w_hat = Q.dequantize_reference(storage, scales, fmt, group)
        ref = Q.linear_reference(x, storage, scales, bias, fmt, group, x_int8=True)
        plain = F.linear(x_hat(x), w_hat, bias)
        assert ((ref - plain).abs().double() <= fp32_reorder_bound(x_hat(x), w_hat, bias)).all(), (fmt, group)


def activation_cases() -> torch.Tensor:
    """Rows of 8 blocks: random, all-zero, huge, tiny (incl. subnormal) and mixed-magnitude blocks, exact ties."""
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(256, generator=g) * 10.0 ** torch.randint(-6, 7, (1,), generator=g).item() for _ in range(6)]
    mixed = torch.cat([torch.randn(32, generator=g) * 10.0 ** k for k in range(-3, 5)])  # 8 blocks, 8 magnitudes
    special = torch.randn(8, 32, generator=g)
    special[0] = 0.0  # all zero
    special[1] *= 1e30
    special[2] = torch.linspace(-1.0, 1.0, 32) * 3.0e38  # near the fp32 maximum
    special[3] *= 1e-30
    special[4] *= 1e-40  # subnormal: amax/127 below the smallest normal, so a zero block
    special[5] = torch.tensor([127.0] + [k + 0.5 for k in range(-15, 16)])  # s = 1: ties round half to even
    special[6, 0] = 1e-30  # one normal value among subnormal ones
    special[6, 1:] *= 1e-42
    special[7] *= 127.0 / special[7].abs().max()  # amax exactly 127·s
    return torch.stack(rows + [mixed, special.reshape(-1)])


@pytest.mark.parametrize("isa", ISAS)
def test_activation_quantizer_twin_is_bit_exact(kernels, isa):
    """The kernels' quantizer of each ISA (scalar, AVX2, AVX-512 vectors) against the twin."""
    x = activation_cases()
    q, s = kernels.quantize_activations(x, Q.ISAS[isa])
    tq, ts = Q.quantize_activations(x)
    assert q.dtype == tq.dtype == torch.int8 and s.dtype == ts.dtype == torch.float32
    assert torch.equal(q, tq) and torch.equal(s.view(torch.int32), ts.view(torch.int32))
    # non-finite values: their block gets s_x = NaN and x_q = 0, other blocks are untouched
    bad = x[:2].clone()
    bad[0, 40], bad[1, 200] = float("nan"), float("inf")
    q, s = kernels.quantize_activations(bad, Q.ISAS[isa])
    tq, ts = Q.quantize_activations(bad)
    assert torch.equal(q, tq) and torch.equal(s.isnan(), ts.isnan()) and torch.equal(s[~s.isnan()], ts[~ts.isnan()])
    assert s[0, 1].isnan() and s[1, 6].isnan() and s.isnan().sum() == 2 and (q[0, 32:64] == 0).all()


def test_activation_quantizer_rounds_and_bounds():
    x = activation_cases()
    q, s = Q.quantize_activations(x)
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1)
    assert q.abs().max() <= 127
    assert torch.equal(s, s.to(torch.bfloat16).float())  # bf16 scales
    zero = amax / 127 < torch.finfo(torch.float32).tiny
    assert zero.any() and (s[zero] == 0).all() and (q.reshape(blocks.shape)[zero] == 0).all()
    assert torch.equal(s[~zero], (amax[~zero] / 127).to(torch.bfloat16).float())
    # each block has its own scale: the 8 magnitudes of the mixed row differ
    assert len(set(s[-2].tolist())) == 8
    # |x − x̂| ≤ s/2 + amax·2⁻⁹ (the clip where bf16 rounded s down), and 0 for the zero blocks' x below 127·FLT_MIN
    err = (blocks - q.reshape(blocks.shape).float() * s[..., None]).abs()
    assert (err <= s[..., None] / 2 + amax[..., None] * 2.0**-9).where(~zero[..., None], True).all()
    assert (err <= 127 * torch.finfo(torch.float32).tiny).where(zero[..., None], True).all()
    # the ties: s = 1, so x_q = round-half-even(k + 0.5)
    ties = q[-1, 5 * 32:6 * 32].tolist()
    assert ties == [127] + [round(k + 0.5) for k in range(-15, 16)] and ties[1:4] == [-14, -14, -12]


def test_activation_quantizer_needs_whole_blocks(kernels):
    with pytest.raises(ValueError, match="not a multiple of 32"):
        Q.quantize_activations(torch.randn(2, 91))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernels.quantize_activations(torch.randn(2, 91), 0)
    assert not Q.quantizes_x("int8", 91, 91) and not Q.quantizes_x("int8", 160, 16)  # such layers keep fp32 x


@pytest.mark.parametrize("isa", ISAS)
def test_non_finite_activations_give_nan_rows(kernels, isa, monkeypatch):
    monkeypatch.setenv("KITELM_QUANT_ISA", isa)
    for fmt, inp, group in [("int8", 96, 32), ("int4", 256, 64)]:
        _, storage, scales, bias = make(fmt, inp, group)
        x = torch.randn(3, inp)
        x[1, 5] = float("inf")
        with torch.inference_mode():
            y = Q.quantized_linear(x, storage, scales, bias, fmt, group)
        ref = Q.linear_reference(x, storage, scales, bias, fmt, group, x_int8=True)
        assert y[1].isnan().all() and ref[1].isnan().all() and y[[0, 2]].isfinite().all()


def test_forced_isa_and_x_format_are_checked(monkeypatch):
    monkeypatch.setenv("KITELM_QUANT_ISA", "sse9")
    with pytest.raises(ConfigError, match="unknown"):
        Q.kernel_isa()
    if "avx512vnni" in ISAS:  # the old name of path 3
        monkeypatch.setenv("KITELM_QUANT_ISA", "avx512bf16")
        assert Q.kernel_isa() == Q.ISAS["avx512vnni"]
    monkeypatch.setenv("KITELM_QUANT_X", "int4")
    with pytest.raises(ConfigError, match="KITELM_QUANT_X"):
        Q.quantizes_x("int8", 64, 32)


@pytest.mark.parametrize("fmt,inp,group", [c for c in CASES if c[0] != "bf16"])
def test_dequantize_kernel_is_bit_exact(fmt, inp, group):
    _, storage, scales, _ = make(fmt, inp, group, out=53)
    ref = Q.dequantize_reference(storage, scales, fmt, group)
    assert torch.equal(Q.dequantize(storage, scales, fmt, group, inp), ref)
    assert torch.equal(Q.dequantize(storage, scales, fmt, group, inp, torch.bfloat16), ref.to(torch.bfloat16))


@pytest.mark.parametrize("fmt,inp,group", CASES)
def test_quantization_error_is_at_most_half_a_step(fmt, inp, group):
    w, storage, scales, _ = make(fmt, inp, group)
    err = (w - Q.dequantize_reference(storage, scales, fmt, group)).abs()
    if fmt == "bf16":
        assert (err <= w.abs() * 2.0**-8).all()
        return
    step = scales.float().repeat_interleave(group, dim=1)
    # s is bf16(amax/qmax): where bf16 rounded s down, the largest weight may clip by up to amax·2⁻⁸
    amax = w.abs().reshape(w.shape[0], -1, group).amax(-1).repeat_interleave(group, dim=1)
    assert (err <= step / 2 + amax * 2.0**-8 + 1e-12).all()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantizing_in_row_chunks_gives_the_same_bits(fmt, monkeypatch):
    """`quantize` works QUANTIZE_CHUNK weights at a time (bounded temporaries for 4 GB matrices): chunks of 3 rows,
    which do not divide the 10 rows, give bit for bit the storage and scales of one pass, all-zero groups included."""
    w = torch.randn(10, 128, dtype=torch.float64).float()
    w[4, :32] = 0.0
    whole = Q.quantize(w, fmt, 32)
    monkeypatch.setattr(Q, "QUANTIZE_CHUNK", 3 * 128)
    chunked = Q.quantize(w, fmt, 32)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))
    assert whole[1].dtype == torch.bfloat16 and torch.equal(whole[1][4, 0], torch.tensor(1.0, dtype=torch.bfloat16))


def test_int4_packing_round_trips():
    q = torch.randint(-8, 8, (5, 96), dtype=torch.int8)
    assert torch.equal(Q.unpack_int4(Q.pack_int4(q)), q)


@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_gemm_path_above_eight_rows_matches_the_twin(fmt, monkeypatch):
    """fp32 tiles (conftest: no native bf16) within the reorder bound; bf16 tiles within the bf16 rounding of x, Ŵ
    and y (u = 2⁻⁸ each) on top of the fp32 accumulation."""
    inp, group = 256, {"bf16": 0, "int8": 32, "int4": 64}[fmt]
    w, storage, scales, bias = make(fmt, inp, group, out=301)
    monkeypatch.setattr(Q, "TILE_ELEMENTS", 64 * inp)  # several tiles
    x = torch.randn(3, 7, inp)
    w_hat = Q.dequantize_reference(storage, scales, fmt, group)
    ref = Q.linear_reference(x, storage, scales, bias, fmt, group)
    with torch.inference_mode():
        y = Q.quantized_linear(x, storage, scales, bias, fmt, group)
    assert ((y - ref).abs().double() <= fp32_reorder_bound(x, w_hat, bias)).all()
    monkeypatch.setattr(Q, "gemm_dtype", lambda x: torch.bfloat16)
    with torch.inference_mode():
        y16 = Q.quantized_linear(x, storage, scales, bias, fmt, group)
    ub = 2.0**-8
    mass = x.abs().double() @ w_hat.abs().double().T
    bound = (2 * ub + ub * ub) * mass + ub * (ref - bias).abs().double() + fp32_reorder_bound(x, w_hat, bias)
    assert ((y16 - ref).abs().double() <= bound).all()


@pytest.mark.parametrize("x_format", Q.X_FORMATS)
def test_layer_output_moves_by_at_most_half_a_step_per_weight(x_format, monkeypatch):
    """Weights: |w − ŵ| ≤ s/2 (+ the bf16 clip slack); int8 x adds Σ|x − x̂|·|ŵ| (4 rows: the GEMV path)."""
    monkeypatch.setenv("KITELM_QUANT_X", x_format)
    lin = torch.nn.Linear(256, 45)
    x = torch.randn(4, 256)
    for fmt, group in (("int8", 32), ("int8", 256), ("int4", 64)):
        q = QuantizedLinear.from_linear(lin, QuantSpec(fmt, group))
        with torch.inference_mode():
            y, ref = q(x), lin(x)
        step = q.scales.float().repeat_interleave(group, dim=1)  # [out, in]
        amax_slack = lin.weight.abs().reshape(45, -1, group).amax(-1).repeat_interleave(group, dim=1) * 2.0**-8
        bound = x.abs().double() @ (step / 2 + amax_slack).double().T + 3 * fp32_reorder_bound(x, lin.weight, lin.bias)
        if Q.quantizes_x(fmt, 256, group) and Q._kernels() is not None:
            w_hat = q.weight.dequantize()
            bound = bound + (x - x_hat(x)).abs().double() @ w_hat.abs().double().T
        assert ((y - ref).abs().double() <= bound).all(), fmt


@pytest.mark.parametrize("preset", ["griffin-tiny", "hawk-tiny", "transformer-mini", "sas-p-small"])
@pytest.mark.parametrize("spec", [QuantSpec("bf16"), QuantSpec("int8", 32), QuantSpec("int8", 0),
                                  QuantSpec("int4", 32, embedding=False)])
def test_quantized_model_equals_fp32_model_with_dequantized_weights(preset, spec, monkeypatch):
    """The quantized model computes exactly what an fp32 model holding Ŵ computes (up to fp32 summation order), in
    the full forward and in token-by-token decoding (with fp32 x on the GEMV path: the int8-x steps are the next
    test's)."""
    monkeypatch.setenv("KITELM_QUANT_X", "fp32")
    config = get_preset(preset)
    model = build_model(config).eval()
    quantized = quantize_model(build_model(config).eval(), spec)
    quantized.load_state_dict({k: v for k, v in model.state_dict().items() if k in quantized.state_dict()},
                              strict=False)  # norms, biases, gates: the same values
    for name, m in quantized.named_modules():
        if hasattr(m, "qweight"):
            m.set_weight(model.get_submodule(name).weight)
            model.get_submodule(name).weight.data = m.weight.dequantize()
    ids = torch.randint(0, config.vocab_size, (2, 19))
    with torch.inference_mode():
        ref, full = model(ids), quantized(ids)
        cache = quantized.new_cache(2, 32)
        steps = torch.cat([quantized(ids[:, t:t + 1], cache=cache) for t in range(ids.shape[1])], dim=1)
    scale = ref.abs().max().item()
    assert (full - ref).abs().max().item() <= 1e-4 * scale
    assert (steps - ref).abs().max().item() <= 1e-4 * scale


@pytest.mark.parametrize("preset", ["griffin-tiny", "transformer-mini"])
@pytest.mark.parametrize("spec", [QuantSpec("int8", 32), QuantSpec("int4", 32)])
def test_decoding_with_int8_activations_stays_near_fp32_activations(preset, spec, monkeypatch):
    """Token-by-token decoding with int8 x (the default) against the same model with fp32 x. A sanity bound, not a
    derived one (the per-layer bound is the test above): int8 x moves each layer by ≲ 1/254 of its input's block
    maxima, while a wrong block, scale or offset moves logits by O(their scale)."""
    config = get_preset(preset)
    torch.manual_seed(5)
    model = quantize_model(build_model(config).eval(), spec)
    ids = torch.randint(0, config.vocab_size, (2, 12))

    def steps(x_format):
        monkeypatch.setenv("KITELM_QUANT_X", x_format)
        with torch.inference_mode():
            cache = model.new_cache(2, 16)
            return torch.cat([model(ids[:, t:t + 1], cache=cache) for t in range(ids.shape[1])], dim=1)

    fp32_x, int8_x = steps("fp32"), steps("int8")
    scale = fp32_x.abs().max().item()
    assert 0 < (int8_x - fp32_x).abs().max().item() <= 0.05 * scale


def test_quantize_refuses_group_sizes_that_do_not_divide():
    with pytest.raises(ConfigError, match="does not divide"):
        quantize_model(build_model(get_preset("griffin-tiny")), QuantSpec("int8", 48))
    with pytest.raises(ConfigError, match="multiple of 32"):
        quantize_model(build_model(get_preset("griffin-tiny")), QuantSpec("int4", 16))
    with pytest.raises(ConfigError, match="unknown"):
        QuantSpec("int3")


# ------------------------------------------------------------------------------------------ checkpoints and CLI
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from kitelm.checkpoint import save_checkpoint
    from kitelm.data.tokenizer import ByteTokenizer

    config = get_preset("griffin-tiny")
    torch.manual_seed(1)
    model = build_model(config)
    return model, save_checkpoint(tmp_path_factory.mktemp("run"), 3, model.state_dict(), config, ByteTokenizer())


@pytest.mark.parametrize("spec", [QuantSpec("bf16"), QuantSpec("int8"), QuantSpec("int8", 0), QuantSpec("int4", 32),
                                  QuantSpec("int4", 64, embedding=False)])
def test_quantize_save_load_round_trip_is_bit_exact(checkpoint, spec, tmp_path):
    import kitelm

    model, folder = checkpoint
    out = quantize_checkpoint(folder, tmp_path / "q", spec)
    assert is_quantized(out) and json.loads((out / "config.json").read_text())["quantization"] == spec.to_dict()
    expected = quantize_model(build_model(get_preset("griffin-tiny")), spec)
    expected.load_state_dict(model.state_dict(), strict=False)
    for name, m in expected.named_modules():
        if hasattr(m, "qweight"):
            m.set_weight(model.get_submodule(name).weight)
    loaded, _ = load_quantized(out)
    got, want = loaded.state_dict(), expected.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    # memory-mapped, and no fp32 copy of any quantized matrix exists in the loaded model
    assert all(b.dtype in (torch.bfloat16, torch.int8, torch.uint8) for n, b in loaded.named_buffers()
               if n.endswith(("qweight", "scales")))
    lm = kitelm.load(out)
    ids = torch.randint(0, 257, (1, 12))
    with torch.inference_mode():
        assert torch.equal(lm.model(ids), expected.eval()(ids))
    assert isinstance(lm.generate("def ", max_new_tokens=4, temperature=0.0), str)


def test_mmap_reader_refuses_truncated_files(checkpoint, tmp_path):
    _, folder = checkpoint
    data = (folder / "model.safetensors").read_bytes()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors_mmap(bad)
    bad.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors_mmap(bad)


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kitelm: error:") and "\n" not in err
    return err


def test_cli_bad_input_is_one_line_and_writes_nothing(checkpoint, tmp_path, capsys):
    _, folder = checkpoint
    q = tmp_path / "q8"
    assert main(["quantize", str(folder), "--weights", "int8", "--out", str(q)]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in q.iterdir()}
    out = tmp_path / "out"
    assert "already quantized" in _one_line_error(capsys, ["quantize", str(q), "--weights", "int4", "--out", str(out)])
    assert "does not divide" in _one_line_error(capsys, ["quantize", str(folder), "--weights", "int8",
                                                         "--group-size", "48", "--out", str(out)])
    assert "already exists" in _one_line_error(capsys, ["quantize", str(folder), "--weights", "int8", "--out", str(q)])
    assert "invalid choice" in _one_line_error(capsys, ["quantize", str(folder), "--weights", "int3", "--out",
                                                        str(out)])
    assert {p.name: p.read_bytes() for p in q.iterdir()} == before  # the existing checkpoint is untouched
    # corrupt packed tensors: one flipped byte inside the int8 data fails the manifest on load and on quantize
    corrupt = tmp_path / "corrupt"
    shutil.copytree(q, corrupt)
    raw = bytearray((corrupt / "model.safetensors").read_bytes())
    raw[-7] ^= 0xFF
    (corrupt / "model.safetensors").write_bytes(bytes(raw))
    assert "corrupt" in _one_line_error(capsys, ["generate", "--checkpoint", str(corrupt), "--prompt", "a"])
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_too_large_for_memory_is_refused_before_loading(checkpoint, tmp_path):
    _, folder = checkpoint
    with pytest.raises(KitelmError, match=r"needs about .* GiB of memory .* available"):
        quantize_checkpoint(folder, tmp_path / "q", QuantSpec("int8"), memory_limit=1000)
    assert not (tmp_path / "q").exists()


def test_corrupt_scales_are_refused(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = checkpoint
    out = quantize_checkpoint(folder, tmp_path / "q", QuantSpec("int4", 32))
    state = load_file(out / "model.safetensors")
    key = next(k for k in state if k.endswith(".scales"))
    state[key][0, 0] = float("nan")
    save_file(state, out / "model.safetensors")
    (out / "manifest.json").unlink()  # no checksum to catch it: the scale check must
    with pytest.raises(CheckpointError, match="scales .* corrupt"):
        load_quantized(out)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny sharded transformers RecurrentGemma folder (widths divisible by 32) with a SentencePiece model."""
    import io

    import sentencepiece as spm
    import transformers

    config = transformers.RecurrentGemmaConfig(
        num_hidden_layers=3, vocab_size=97, hidden_size=64, intermediate_size=2 * 128, num_attention_heads=4,
        num_key_value_heads=1, lru_width=64, attention_window_size=16, conv1d_width=4, logits_soft_cap=30.0,
        block_types=["recurrent", "recurrent", "attention"], pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    hf = transformers.RecurrentGemmaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder, max_shard_size="100KB")
    words = ["alpha", "beta", "gamma", "delta", "griffin", "hawk", "state", "window", "token", "scan"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([" ".join(words[(i * 7 + j) % 10] for j in range(8))
                                                           for i in range(300)]), model_writer=buf, vocab_size=32,
                                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    return folder


def test_convert_with_weights_streams_an_hf_folder(hf_folder, tmp_path, capsys):
    import kitelm
    from kitelm.convert import load_model

    out = tmp_path / "rg-int8"
    assert main(["convert", str(hf_folder), "--weights", "int8", "--out", str(out)]) == 0
    lm = kitelm.load(out)
    ref = load_model(hf_folder).eval()
    ids = torch.randint(0, 97, (1, 10))
    with torch.inference_mode():
        a, b = lm.model(ids), ref(ids)
    kl = F.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="batchmean").item()
    assert kl < 1e-3  # int8 at group 32 on a random model: far below one nat (a sanity bound, not a fit)


def test_truncated_hf_shard_is_one_line_and_writes_nothing(hf_folder, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(hf_folder, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])
    out = tmp_path / "out"
    assert "truncated" in _one_line_error(capsys, ["quantize", str(broken), "--weights", "int4", "--out", str(out)])
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8", "int4"])
def test_decode_bench_builds_block_by_block_what_quantize_builds(weights):
    """The benchmark's streamed random model has exactly the structure and dtypes of a quantized checkpoint's model
    (and it runs); its timings are not checked: benchmarks are not tests."""
    from kitelm.experiments.bench.decode import measure, random_model

    model = random_model("griffin-tiny", weights)
    reference = build_model(get_preset("griffin-tiny"))
    if weights != "fp32":
        reference = quantize_model(reference, QuantSpec(weights))
    got, want = model.state_dict(), reference.state_dict()
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}
    row = measure("griffin-tiny", weights, -1, True, prompt_lens=[16], batches=[1, 3], steps=3)
    assert {"ms_per_token", "floor_ms", "prefill16_tok_s", "batch3_tok_s", "peak_rss_GB"} <= set(row)
