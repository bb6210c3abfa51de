"""Double-quantized group scales (llama.cpp's k-quants): spec, maps, storage, algorithms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.algorithms import AWQ, GPTQ, HQQ, RTN, LayerStats
from lowbit.quant.maps import (
    QParams,
    choose_qparams,
    dequantize,
    double_quantize,
    fake_quantize,
    qparams_from_range,
    quantize,
    to_double_quantized,
)
from lowbit.spec import QuantSpec, as_spec, preset
from lowbit.tensor import QuantizedTensor, stored_nbytes

Q4K, Q5K, Q6K = preset("q4_k"), preset("q5_k"), preset("q6_k")
SPECS = ("q4_k", "q5_k", "q6_k", "int4-g32-sym-dq6x8", "int3-g16-sym-full-dq6x16",
         "uint2-g16-asym-fz-dq4x16", "int4-g32-asym-fz-dq6x8")


def test_presets_print_and_parse_as_their_spec_strings() -> None:
    assert str(Q4K) == "uint4-g32-asym-fz-dq6x8"
    assert str(Q6K) == "int6-g16-sym-full-dq8x16"
    for spec in (Q4K, Q5K, Q6K):
        assert as_spec(str(spec)) == spec
        assert QuantSpec.from_json(spec.to_json()) == spec
    assert as_spec("uint4-g32-asym-fz-dq4x2").super_group == 2
    # fields absent unless set: checkpoints of other specs stay readable by older lowbit
    assert "scale_bits" not in preset("q4_0").to_dict()


@pytest.mark.parametrize(("name", "bits"), [("q2_k", 2.625), ("q3_k", 3.4375), ("q4_k", 4.5),
                                            ("q5_k", 5.5), ("q6_k", 6.5625)])
def test_bits_per_weight_are_ggmls(name: str, bits: float) -> None:
    """Q2_K 84 bytes, Q3_K 110, Q4_K 144, Q5_K 176, Q6_K 210 per 256 weights."""
    assert stored_nbytes(name, (4096, 4096)) * 8 / 4096**2 == bits
    qt = QuantizedTensor.from_float(torch.randn(16, 512), name)
    assert qt.bits_per_weight == bits


@pytest.mark.parametrize(("fields", "match"), [
    ({"format": "nf4", "symmetric": True, "scale_bits": 6}, "integer formats"),
    ({"format": "uint4", "granularity": "channel", "scale_bits": 6}, "granularity='group'"),
    ({"format": "uint4", "scale_bits": 6}, "use zero_point='float'"),
    ({"format": "int4", "symmetric": True, "scale_bits": 9}, "scale_bits=9; allowed"),
    ({"format": "int4", "symmetric": True, "super_group": 8}, "without scale_bits"),
    ({"format": "int4", "symmetric": True, "scale_bits": 6, "super_group": 0},
     "super_group=0; allowed"),
    ({"format": "int8", "granularity": "group", "group_size": 32, "symmetric": True,
      "scale_bits": 6, "dynamic": True}, "for weights"),
])
def test_bad_double_quantization_fields_raise_one_line(fields, match) -> None:
    with pytest.raises(ValueError, match=match) as info:
        QuantSpec(**fields)
    assert "\n" not in str(info.value)


def test_super_group_defaults_to_eight() -> None:
    assert QuantSpec("int4", symmetric=True, group_size=32, scale_bits=6).super_group == 8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=40),
       st.integers(2, 8), st.integers(1, 16))
def test_double_quantized_scales_are_within_half_a_super_step(values, bits, group) -> None:
    """Each effective scale is its super-block's scale times a nonzero code, at most half a
    super step from the float scale (or the smallest code's scale above it)."""
    spec = QuantSpec("uint4", group_size=32, zero_point="float", scale_bits=bits,
                     super_group=group)
    s = torch.tensor(values).unsqueeze(0)
    m = s.flip(-1)
    qp = double_quantize(s, m, spec)
    codes = qp.scale_codes
    assert bool((codes.scale >= 1).all()) and int(codes.scale.max()) < 1 << bits
    step = codes.super_scale.float().repeat_interleave(group, -1)[:, : s.shape[1]]
    assert torch.equal(qp.scale, codes.scale.float() * step)
    near = (qp.scale - s).abs() <= step / 2 + 1e-6 * s
    assert bool((near | (codes.scale == 1)).all())  # (the smallest code: a scale never 0)
    m_step = codes.super_min.float().repeat_interleave(group, -1)[:, : s.shape[1]]
    minimum = codes.minimum.float() * m_step
    assert bool(((minimum - m).abs() <= m_step / 2 + 1e-6 * m).all())


@pytest.mark.parametrize("name", SPECS)
def test_q_and_q_inverse_come_from_one_map(name: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(24, 384) * torch.rand(24, 1)
    spec = as_spec(name)
    codes, qp, layout = quantize(w, spec)
    qt = QuantizedTensor.from_float(w, spec)
    qt.validate()
    assert torch.equal(qt.dequantize(), dequantize(codes, qp, spec, layout))
    assert torch.equal(qt.dequantize(), fake_quantize(w, spec))
    # the stored form decodes to the same effective qparams
    assert torch.equal(qt.qparams.scale, qp.scale)
    # the float view kernels run is the same weight
    flat = qt.with_float_scales()
    assert not flat.spec.double_quantized and torch.equal(flat.dequantize(), qt.dequantize())
    back = QuantizedTensor.from_state_dict(qt.state_dict("m."), spec, "m.")
    assert torch.equal(back.dequantize(), qt.dequantize())


@pytest.mark.parametrize(("dq", "plain", "ratio"), [
    ("q4_k", "uint4-g32-asym-fz", 1.05), ("q5_k", "uint5-g32-asym-fz", 1.05),
    ("q6_k", "int6-g16-sym-full", 1.1)])
def test_six_bit_scales_lose_little_against_fp16_scales(dq: str, plain: str, ratio: float):
    torch.manual_seed(1)
    w = torch.randn(64, 1024) * torch.rand(64, 1)
    err = {n: float((fake_quantize(w, as_spec(n)) - w).pow(2).mean()) for n in (dq, plain)}
    assert err[dq] <= ratio * err[plain], err


@pytest.mark.parametrize(("name", "ratio"), [("q4_k", 0.95), ("q5_k", 0.95), ("q6_k", 0.99)])
def test_searched_scales_beat_min_max_ones(name: str, ratio: float) -> None:
    """choose_qparams of a k-quant searches the step size and refits scale (and minimum) by
    weighted least squares, as llama.cpp's quantizer: less error than the min-max range."""
    spec = preset(name)
    torch.manual_seed(4)
    w = torch.distributions.StudentT(4.0).sample((64, 512)) * torch.rand(64, 1)
    xb = w.reshape(64, -1, spec.group_size)
    minmax = qparams_from_range(xb.amin(-1), xb.amax(-1), spec)
    err = {k: float((fake_quantize(w, spec, qp) - w).pow(2).sum())
           for k, qp in (("search", choose_qparams(w, spec)), ("minmax", minmax))}
    assert err["search"] < ratio * err["minmax"], err


def test_refined_float_qparams_of_all_positive_groups_keep_their_range() -> None:
    """HQQ / AWQ refine the plain spec's float qparams; a group above 0 has a negative minimum
    there, which a k-quant cannot store: its range is widened to 0, not clipped."""
    torch.manual_seed(5)
    w = torch.randn(16, 256) * 0.3 + 3.0
    plain = choose_qparams(w, Q4K.plain_scales())
    qp = to_double_quantized(plain, Q4K)
    err = float((fake_quantize(w, Q4K, qp) - w).pow(2).mean())
    rtn = float((fake_quantize(w, Q4K) - w).pow(2).mean())
    assert err < 2 * rtn


def test_kernels_take_the_float_view_not_the_codes() -> None:
    from lowbit.kernels import KERNELS, dispatch

    qt = QuantizedTensor.from_float(torch.randn(8, 256), "int4-g32-sym-dq6x8+a:int8-token-sym-dyn")
    x = torch.randn(2, 256)
    assert not any(k.supports(qt, x) for k in KERNELS.values())  # direct calls refused
    chosen = dispatch.select_kernel(qt, x)
    assert chosen.supports(qt.with_float_scales(), x)


def test_an_overflowing_minimum_names_zero_dtype() -> None:
    w = -5e6 - torch.rand(2, 256)
    with pytest.raises(ValueError, match="zero_dtype='float32'"):
        QuantizedTensor.from_float(w, Q4K.replace(scale_dtype="float32"))


def test_a_zero_scale_code_is_refused_at_load() -> None:
    qt = QuantizedTensor.from_float(torch.randn(4, 256), "q4_k")
    state = qt.state_dict()
    state["scale"] = torch.zeros_like(state["scale"])
    with pytest.raises(ValueError, match="zero scale"):
        QuantizedTensor.from_state_dict(state, "q4_k")


def test_from_codes_needs_the_scale_codes() -> None:
    w = torch.randn(4, 256)
    codes, qp, _ = quantize(w, Q4K)
    with pytest.raises(ValueError, match="lack scale_codes"):
        QuantizedTensor.from_codes(codes, QParams(qp.scale, qp.zero_point), Q4K, (4, 256))


def test_to_double_quantized_codes_plain_qparams() -> None:
    torch.manual_seed(2)
    w = torch.randn(8, 512)
    plain = choose_qparams(w, Q4K.plain_scales())
    qp = to_double_quantized(plain, Q4K)
    assert qp.scale_codes is not None
    rel = (qp.scale - plain.scale.float()).abs() / plain.scale.float()
    assert float(rel.max()) < 0.1


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((32, 512)) * 0.02
    x = torch.randn(1024, 24) @ torch.randn(24, 512) + 0.05 * torch.randn(1024, 512)
    stats = LayerStats()
    stats.update(x)
    return w, x, stats


@pytest.mark.parametrize("name", ["q4_k", "q6_k", "uint2-g16-asym-fz-dq4x16"])
@pytest.mark.parametrize("algorithm", [GPTQ(), GPTQ(static_groups=True), GPTQ(act_order=True)],
                         ids=["gptq", "static", "act-order"])
def test_gptq_beats_rtn_on_double_quantized_specs(layer, name: str, algorithm) -> None:
    w, x, stats = layer
    spec = as_spec(name)

    def out_err(qt: QuantizedTensor) -> float:
        qt.validate()
        assert qt.spec == spec
        return float((x @ (w - qt.dequantize()).t()).norm())

    assert out_err(algorithm.quantize_weight(w, spec, stats)) < 0.5 * out_err(
        RTN().quantize_weight(w, spec, stats))


def test_gptq_stacked_weights_equal_one_by_one(layer) -> None:
    w, _, stats = layer
    a, b = w[:16], w[16:]
    together = GPTQ().quantize_weights([a, b], Q4K, stats)
    for part, qt in zip((a, b), together, strict=True):
        alone = GPTQ().quantize_weight(part, Q4K, stats)
        assert torch.allclose(qt.dequantize(), alone.dequantize(), atol=1e-3)


@pytest.mark.parametrize("algorithm", [HQQ(iters=5), AWQ()], ids=["hqq", "awq-clip"])
def test_float_refining_algorithms_end_double_quantized(layer, algorithm) -> None:
    """... and lose little against the same algorithm's fp16 scales and minimums."""
    w, x, stats = layer
    qt = algorithm.quantize_weight(w, Q4K, stats)
    qt.validate()
    plain = algorithm.quantize_weight(w, Q4K.plain_scales(), stats)
    assert qt.spec == Q4K and qt.super_scale is not None
    err = float((x @ (w - qt.dequantize()).t()).norm())
    assert err < 1.1 * float((x @ (w - plain.dequantize()).t()).norm())


@pytest.mark.parametrize(("name", "kernel"), [("q4_k", "cpu_int4"), ("q5_k", "cpu_int5"),
                                             ("q6_k", "reference")])  # (groups of 16)
def test_embeddings_and_linears_run_on_the_decoded_scales(name: str, kernel: str) -> None:
    """QuantEmbedding's row lookup (the CPU kernel library's, or torch's) and QuantLinear's
    kernel (the plain spec's) give the dequantized weight's rows and products."""
    from torch import nn

    from lowbit.kernels import dispatch
    from lowbit.nn.modules import QuantEmbedding, QuantLinear

    torch.manual_seed(3)
    emb = QuantEmbedding(nn.Embedding(50, 512), name)
    ids = torch.tensor([[3, 7, 49], [0, 3, 1]])
    assert torch.equal(emb(ids), emb.qweight.dequantize()[ids])
    lin = QuantLinear.from_float(nn.Linear(512, 24), name)
    x = torch.randn(5, 512)
    ref = x @ lin.qweight.dequantize().t() + lin.bias
    assert torch.allclose(lin(x), ref, atol=1e-4)
    from lowbit.kernels import cpu_avx2

    if cpu_avx2.extension() is not None:
        assert dispatch.select_kernel(lin.qweight, x).name == kernel


def test_qat_refuses_double_quantized_specs() -> None:
    from torch import nn

    from lowbit.algorithms.qat import prepare

    with pytest.raises(ValueError, match="double-quantized scale codes"):
        prepare(nn.Sequential(nn.Linear(256, 8)), "q4_k")


def test_unsigned_and_signed_full_range_k_quants_agree() -> None:
    """An unsigned symmetric grid is the signed one stored offset by 2**(b-1): the searched
    scales and values are the same."""
    torch.manual_seed(6)
    w = torch.randn(8, 256)
    unsigned, signed = (fake_quantize(w, as_spec(n)) for n in ("uint6-g16-sym-full-dq8x16",
                                                                "int6-g16-sym-full-dq8x16"))
    assert torch.equal(unsigned, signed)
    assert float((signed - w).pow(2).mean()) < 1e-3


@pytest.mark.parametrize("name", ["q2_k", "q4_k", "q5_k"])
def test_a_constant_group_leaves_its_super_block_alone(name: str) -> None:
    """A zero (or constant) group gets scale 0 from the search, as llama.cpp's: it does not
    raise its super-block's scale, so the other groups keep their resolution."""
    spec = preset(name)
    torch.manual_seed(7)
    w = torch.randn(8, 512) * 0.002
    zeroed = w.clone()
    zeroed[:, : spec.group_size] = 0
    rest = slice(spec.group_size, None)
    err = [float((fake_quantize(x, spec) - x)[:, rest].pow(2).mean()) for x in (w, zeroed)]
    assert err[1] < 1.05 * err[0]
    assert torch.equal(fake_quantize(zeroed, spec)[:, : spec.group_size],
                       torch.zeros(8, spec.group_size))


def test_refined_float_qparams_of_all_negative_groups_are_not_widened() -> None:
    torch.manual_seed(8)
    w = torch.randn(16, 256) * 0.01 - 0.1
    qp = to_double_quantized(choose_qparams(w, Q4K.plain_scales()), Q4K)
    err = float((fake_quantize(w, Q4K, qp) - w).pow(2).mean())
    assert err < 1.5 * float((fake_quantize(w, Q4K) - w).pow(2).mean())


@pytest.mark.parametrize("magnitude", [1e-20, 1e16])
def test_the_search_is_scale_invariant_with_float32_scales(magnitude: float) -> None:
    spec = Q6K.replace(scale_dtype="float32")
    torch.manual_seed(9)
    w = torch.randn(4, 512)
    rel = (fake_quantize(w * magnitude, spec) / magnitude - fake_quantize(w, spec)).abs().max()
    assert float(rel) < 1e-5
