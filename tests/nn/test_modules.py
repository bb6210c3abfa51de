import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.kernels import cpu_avx2, dispatch, select_kernel
from lowbit.nn.modules import QuantConv2d, QuantEmbedding, QuantLinear
from lowbit.quant import fake_quantize
from lowbit.spec import QuantSpec
from lowbit.tensor import QuantizedTensor


def test_quant_linear_equals_fake_quantized_float_linear():
    torch.manual_seed(0)
    lin = nn.Linear(256, 32)
    q = QuantLinear.from_float(lin, "w4g128")
    q.kernel = "reference"  # bit-exact oracle; fast kernels are checked in tests/kernels
    x = torch.randn(5, 256)
    ref = torch.nn.functional.linear(x, fake_quantize(lin.weight.detach(), q.spec), lin.bias)
    assert torch.equal(q(x), ref)
    assert q.weight_packed.dtype == torch.uint8 and q.weight_packed.shape == (32, 128)


def test_gpt2_conv1d_is_transposed_into_quant_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 128)  # nf=48 outputs, nx=128 inputs; weight [128, 48]
    q = QuantLinear.from_float(conv, "w8")
    x = torch.randn(2, 7, 128)
    assert q.weight_logical_shape == (48, 128)
    assert torch.allclose(q(x), conv(x), atol=0.02)


def test_conv2d_and_embedding():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    qc = QuantConv2d(conv, "w8")
    x = torch.randn(1, 3, 8, 8)
    assert torch.allclose(qc(x), conv(x), atol=0.02)
    emb = nn.Embedding(50, 64)
    qe = QuantEmbedding(emb, "w4g64")
    ids = torch.tensor([[1, 2, 49], [0, 0, 7]])
    full = fake_quantize(emb.weight.detach(), qe.spec)
    assert torch.equal(qe(ids), full[ids])


@pytest.mark.parametrize("spec", ["w4g64", "w3g128", "w2g64", "nf4g64", "fp8", "km4", "w8",
                                  "q5_0", "q5_1", "int6-g32-sym"])
def test_embedding_lookup_equals_the_dequantized_table(spec: str) -> None:
    """CPU float32 tables are looked up by the kernel library (cpu_avx2.embedding_rows), bit for
    bit the rows of the dequantized table; the torch path answers the rest."""
    torch.manual_seed(0)
    qe = QuantEmbedding(nn.Embedding(70, 128), spec)
    ids = torch.tensor([[1, 2, 69], [0, 0, 7]])
    fast = cpu_avx2.embedding_rows(qe.qweight, ids, {})
    assert fast is not None or cpu_avx2.extension() is None
    assert torch.equal(qe(ids), qe.qweight.dequantize()[ids])
    assert qe(torch.zeros(0, dtype=torch.long)).shape == (0, 128)
    for bad in ([70], [-1], [[3, 70]], [[-1, 3]]):
        with pytest.raises(IndexError):
            qe(torch.tensor(bad))
    with pytest.raises((IndexError, RuntimeError)):  # torch's own error for float ids
        qe(torch.tensor([2.9]))
    assert torch.equal(qe(ids.int()), qe(ids))
    if qe.qweight.scale is not None:  # the bound lookup follows in-place edits
        with torch.no_grad():
            qe.weight_scale.mul_(2)
        assert torch.equal(qe(ids), qe.qweight.dequantize()[ids])


@pytest.mark.parametrize("spec", [
    QuantSpec("int4", "group", group_size=64, zero_point="float"),
    QuantSpec("uint6", "channel", scale_dtype="float32"),
    QuantSpec("uint8", "group", group_size=64, zero_point="float"),
    "q4_k"], ids=str)
def test_embedding_lookup_of_tables_whose_zero_term_may_round_is_exact(spec) -> None:
    """Where the kernel's s * (z - qmin) can round and Q^-1's (q - z) * s not (signed or 8-bit
    float zero-points, float32 scales with zero-points, a k-quant's decoded float view), the
    table takes the torch path (a kernel row would differ from Q^-1 by an ulp)."""
    torch.manual_seed(1)
    qe = QuantEmbedding(nn.Embedding(64, 256), spec)
    assert cpu_avx2.embedding_rows(qe.qweight, torch.tensor([1]), {}) is None
    ids = torch.arange(64)
    assert torch.equal(qe(ids), qe.qweight.dequantize()[ids])


def test_quantized_linear_follows_in_place_edits_of_a_half_precision_bias() -> None:
    q = QuantLinear.from_float(nn.Linear(128, 16).to(torch.bfloat16), "w4g128")
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        before = q(x)
        q.bias.add_(1.0)
        assert torch.allclose(q(x).float(), before.float() + 1, atol=0.05)


def test_state_dict_round_trip_through_a_fresh_module():
    lin = nn.Linear(128, 16)
    q = QuantLinear.from_float(lin, "w3g128")
    sd = q.state_dict()
    assert {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "bias"} <= set(sd)
    fresh = QuantLinear(128, 16, "w3g128")
    fresh.load_state_dict(sd)
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), q(x))


def test_meta_device_construction_allocates_nothing():
    q = QuantLinear(4096, 4096, "w4g128", device="meta")
    assert q.weight_packed.is_meta and q.weight_packed.shape == (4096, 2048)


def test_reference_kernel_is_forced_by_env(monkeypatch):
    q = QuantLinear.from_float(nn.Linear(64, 8), "w8")
    x = torch.randn(2, 64)
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    assert select_kernel(q.qweight, x).name == "reference"
    monkeypatch.setenv("LOWBIT_KERNEL", "nope")
    with pytest.raises(ValueError, match="kernel='nope' is not registered"):
        q(x)


def test_model_quantize_with_patterns_and_summary():
    model = nn.Sequential()
    model.add_module("embed", nn.Embedding(100, 64))
    model.add_module("proj", nn.Linear(64, 128))
    model.add_module("head", nn.Linear(128, 100))
    lowbit.quantize(model, {"head": None, "re:^pro": "w4g64", "*": "w8"})
    s = model.lowbit_summary
    status = {m.name: (m.status, m.spec) for m in s.modules}
    assert status["proj"] == ("quantized", "uint4-g64-asym")
    assert status["embed"] == ("quantized", "int8-ch-sym")
    assert status["head"][0] == "skipped"
    assert isinstance(model.head, nn.Linear) and isinstance(model.proj, QuantLinear)
    assert s.bytes_after < s.bytes_before
    assert "biases are kept in float" in s.notes


def test_model_quantize_include_exclude_and_errors():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10))
    lowbit.quantize(model, "w8", exclude=["1"])
    assert isinstance(model[0], QuantLinear) and isinstance(model[1], nn.Linear)
    bad = nn.Sequential(nn.Linear(100, 8))
    with pytest.raises(ValueError, match=r"layer '0' \(Linear\): group_size=128"):
        lowbit.quantize(bad, "w4g128")
    nan = nn.Sequential(nn.Linear(64, 8))
    with torch.no_grad():
        nan[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer '0'.*NaN"):
        lowbit.quantize(nan, "w8")
    with pytest.raises(ValueError, match="algorithm="):
        lowbit.quantize(model, "w8", algorithm="magic")


@pytest.mark.parametrize("spec", ["w4g128", "w8", "w8a8"])
def test_memoized_kernel_follows_weight_changes(spec):
    """The kernel bound at the first call is reused, but never for changed weights: a buffer
    replaced by assignment, set_weight, load_state_dict or .to() gives fresh results."""
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(128, 64), spec)
    x = torch.randn(3, 128)
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first)  # memoized path, same answer
        layer.weight_scale = layer.weight_scale * 2  # new tensor, caches not told
        assert torch.allclose(layer(x) - layer.bias, 2 * (first - layer.bias), rtol=1e-5,
                              atol=1e-5)
        other = QuantLinear.from_float(nn.Linear(128, 64), spec)
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), other(x))
        layer.set_weight(QuantLinear.from_float(nn.Linear(128, 64), spec).qweight)
        assert not torch.equal(layer(x), other(x))
        before = layer(x)
        layer.to(torch.float32)
        assert torch.equal(layer(x), before)
        # the same buffer object at a new address; a bias buffer made a parameter
        layer.weight_packed.data = other.weight_packed.clone()
        assert torch.equal(layer(x), dispatch.linear(x, layer.qweight, layer.bias))
        layer.bias = nn.Parameter(torch.ones(64))
        assert torch.equal(layer(x), dispatch.linear(x, layer.qweight, layer.bias))
        layer(x)
        layer.bias.data = torch.full((64,), 2.0)  # the parameter's storage swapped
        assert torch.equal(layer(x), dispatch.linear(x, layer.qweight, layer.bias))


def test_weights_made_in_inference_mode_and_in_place_qparam_edits():
    """Tensors created under inference_mode have no version counter (the kernels' caches must
    cope); an in-place edit of the scale or zero-point is seen by the next call."""
    torch.manual_seed(1)
    with torch.inference_mode():
        layer = QuantLinear.from_float(nn.Linear(128, 8), "w4g64")
        x = torch.randn(2, 128)
        assert torch.allclose(layer(x), F.linear(x, layer.qweight.dequantize(), layer.bias),
                              atol=1e-5)
    layer = QuantLinear.from_float(nn.Linear(128, 8), "w4g64")
    with torch.no_grad():
        layer(x)
        layer.weight_scale.mul_(2)
        layer.weight_zero_point.add_(1)
        ref = F.linear(x, layer.qweight.dequantize(), layer.bias)
        assert torch.allclose(layer(x), ref, atol=1e-5)


def test_a_spec_that_does_not_parse_fails_before_any_module_is_looked_at():
    for spec in ("bogus", {"*": "w8", "fc*": "nope"}):
        with pytest.raises(ValueError):
            lowbit.quantize(nn.Sequential(nn.ReLU()), spec)  # nothing to quantize: still fails


def test_patterns_that_leave_nothing_to_quantize_fail_and_change_nothing():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    for kwargs, why in [({"include": ["layers.*"]}, "2 not matched by include"),
                        ({"include": []}, "2 not matched by include"),
                        ({"exclude": ["*"]}, "2 excluded by '\\*'"),
                        ({"spec": {"fc*": "w8"}}, "2 no spec pattern matches")]:
        spec = kwargs.pop("spec", "w8")
        with pytest.raises(ValueError, match=f"no module left to quantize: 2 candidates \\({why}"
                                             r"\); module names look like '0', '2'"):
            lowbit.quantize(model, spec, **kwargs)
        assert isinstance(model[0], nn.Linear) and isinstance(model[2], nn.Linear)
    lowbit.quantize(nn.Sequential(nn.ReLU()), "w8")  # nothing to choose from: not an error


def test_set_weight_drops_the_group_index_of_the_weight_before():
    lin = nn.Linear(256, 8)
    q = QuantLinear.from_float(lin, "w4g128")
    shuffled = QuantizedTensor.from_float(lin.weight.detach(), "w4g128")
    shuffled.g_idx = torch.arange(256, dtype=torch.int32) % 2
    q.set_weight(shuffled)
    plain = QuantizedTensor.from_float(torch.randn(8, 256), "w4g128")
    q.set_weight(plain)
    assert "weight_g_idx" not in dict(q.named_buffers())
    x = torch.randn(3, 256)
    with torch.no_grad():
        torch.testing.assert_close(q(x), x @ plain.dequantize().T + q.bias)


@pytest.mark.parametrize("spec", ["w4g128", "w8a8", "w8a8-static"])
def test_a_module_that_ran_pickles_and_runs_again(spec, tmp_path):
    q = QuantLinear.from_float(nn.Linear(128, 32), spec)
    x = torch.randn(2, 128)
    with torch.no_grad():
        y = q(x)
        torch.save(q, tmp_path / "q.pt")
        again = torch.load(tmp_path / "q.pt", weights_only=False)
        assert torch.equal(again(x), y) and torch.equal(copy.deepcopy(q)(x), y)


def test_embedding_max_norm_is_applied_before_quantizing():
    emb = nn.Embedding(16, 32, max_norm=1.0)
    with torch.no_grad():
        emb.weight.mul_(10)
    q = QuantEmbedding(emb, "w8")
    ids = torch.tensor([[1, 2, 3]])
    expected = emb(ids).detach()  # renormalizes rows 1-3 in place
    assert torch.linalg.vector_norm(expected, dim=-1).max() <= 1.0 + 1e-5
    torch.testing.assert_close(q(ids), expected, atol=0.02, rtol=0)


@pytest.mark.parametrize("spec", ["w8a8", "w4a8", "w8a8-static"])
def test_activation_quantizing_layers_pass_straight_through_gradients(spec):
    q = QuantLinear.from_float(nn.Linear(256, 64), spec)
    x = torch.randn(3, 256, requires_grad=True)
    y = q(x)
    with torch.no_grad():
        assert torch.equal(y.detach(), q(x))  # the same integer kernel computed it
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ q.qweight.dequantize())


def test_inputs_that_are_not_float_or_do_not_fit_are_refused():
    q = QuantLinear.from_float(nn.Linear(256, 4), "w4g128")
    with torch.no_grad(), pytest.raises(TypeError, match="floating-point.*int64"):
        q(torch.ones(1, 256, dtype=torch.int64))
    with torch.no_grad(), pytest.raises(ValueError, match=r"x \(2, 128\) does not fit weight"):
        q(torch.ones(2, 128))


def test_torch_attention_layers_keep_the_linears_they_read_in_float():
    layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128,
                                       batch_first=True).eval()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        expected = layer(x)
    with pytest.raises(ValueError, match=r"no module left to quantize: 3 candidates \(2 nn.Tra"
                                         r"nsformerEncoderLayer\(batch_first=True\) reads "):
        lowbit.quantize(layer, "w8")
    unfused = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128).eval()
    lowbit.quantize(unfused, "w8")  # batch_first=False never takes the fused path
    assert isinstance(unfused.linear1, QuantLinear) and unfused(x.transpose(0, 1)) is not None
    decoder = nn.TransformerDecoderLayer(d_model=64, nhead=4, dim_feedforward=128,
                                         batch_first=True).eval()
    lowbit.quantize(decoder, "w8")
    skipped = {m.name: m.reason for m in decoder.lowbit_summary.skipped}
    assert set(skipped) == {"self_attn.out_proj", "multihead_attn.out_proj"}
    assert isinstance(decoder.linear1, QuantLinear)
    with torch.no_grad():
        assert decoder(x, x).shape == (2, 5, 64)
        assert torch.equal(layer(x), expected)  # refused: left as it was


def test_a_module_under_two_names_is_quantized_once():
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    lowbit.quantize(model, "w8")
    assert model[0] is model[2] and isinstance(model[0], QuantLinear)
    assert [m.name for m in model.lowbit_summary.modules] == ["0"]
    assert "'2' is '0'" in model.lowbit_summary.notes[0]


def test_a_call_repeated_on_its_own_output_is_a_no_op():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    lowbit.quantize(model, "w8", include=["0"])
    lowbit.quantize(model, "w8", include=["0"])
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], nn.Linear)


@pytest.mark.parametrize("preset", ["w4g128", "w8", "nf4g64", "w8a8"])
@pytest.mark.parametrize("kernel", [None, "reference"])
def test_output_dtype_under_autocast_is_nn_linears(preset: str, kernel: str | None) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    q = QuantLinear.from_float(lin, preset)
    q.kernel = kernel
    x = torch.randn(3, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = lin(x), q(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want.float(), rtol=0.1, atol=0.15)
    assert q(x).dtype == torch.float32  # outside autocast: the input's dtype


def test_load_state_dict_brings_or_drops_the_group_index_with_the_weight():
    torch.manual_seed(0)
    shuffled = QuantizedTensor.from_float(torch.randn(8, 256), "w4g128")
    shuffled.g_idx = (torch.randperm(256) % 2).to(torch.int32)
    with_g_idx = QuantLinear(256, 8, lowbit.preset("w4g128"))
    with_g_idx.set_weight(shuffled)
    plain = QuantLinear.from_float(nn.Linear(256, 8), "w4g128")
    x = torch.randn(3, 256)
    target = QuantLinear.from_float(nn.Linear(256, 8), "w4g128")
    target.load_state_dict(with_g_idx.state_dict())
    assert torch.equal(target(x), with_g_idx(x))
    target.load_state_dict(plain.state_dict())
    assert "weight_g_idx" not in dict(target.named_buffers())
    assert torch.equal(target(x), plain(x))


@pytest.mark.parametrize("kernel", [None, "reference"])
def test_embedding_of_no_ids_is_empty_as_nn_embeddings(kernel: str | None) -> None:
    emb = nn.Embedding(50, 256)
    q = QuantEmbedding(emb, "w4g128")
    q.kernel = kernel
    ids = torch.zeros(2, 0, dtype=torch.long)
    got = q(ids)
    assert got.shape == emb(ids).shape == (2, 0, 256) and got.dtype == torch.float32


def test_subclasses_with_a_forward_of_their_own_stay_float():
    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 8.0

    class Plain(nn.Linear):  # inherits Linear's forward: quantized as any Linear
        pass

    class Same(nn.Linear):  # its own forward computes what Linear's does (as FalconLinear)
        def forward(self, x):
            return x @ self.weight.T + self.bias

    class Clamped(nn.Linear):  # equal to Linear on small inputs only
        def forward(self, x):
            return super().forward(x).clamp(-8, 8)

    class LearnedScale(nn.Linear):  # a parameter of its own, 1.0 at first
        def __init__(self, *args):
            super().__init__(*args)
            self.logit_scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return super().forward(x) * self.logit_scale

    model = nn.Sequential(Scaled(64, 128), Plain(128, 128), Same(128, 128), Clamped(128, 128),
                          LearnedScale(128, 128), nn.Linear(128, 8))
    class FivePercent(nn.Linear):  # within a loose bf16 tolerance, but not plain
        def forward(self, x):
            return super().forward(x) * 1.05

    bf16 = nn.Sequential(Same(1024, 64).bfloat16(), FivePercent(64, 64).bfloat16())
    lowbit.quantize(model, "w8")
    lowbit.quantize(bf16, "w8")
    assert isinstance(bf16[1], FivePercent)
    assert isinstance(model[0], Scaled) and isinstance(model[3], Clamped)
    assert isinstance(model[4], LearnedScale)
    assert all(isinstance(m, QuantLinear) for m in (model[1], model[2], model[5], bf16[0]))
    skipped = model.lowbit_summary.skipped
    assert [m.name for m in skipped] == ["0", "3", "4"]
    assert "Scaled has a forward of its own" in skipped[0].reason
    with pytest.raises(ValueError, match="no module left to quantize: 1 candidates"):
        lowbit.quantize(nn.Sequential(Scaled(64, 128)), "w8")


@pytest.mark.parametrize("spec", ["w4g64", "w8", "nf4g64", "w8a8"])
def test_weight_reads_as_the_dequantized_float_weight(spec: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = QuantLinear.from_float(lin, spec)
    w = q.weight
    assert isinstance(w, torch.Tensor) and not isinstance(w, nn.Parameter)
    assert (w.shape, w.dtype, w.device, w.requires_grad) == ((48, 64), torch.float32,
                                                              torch.device("cpu"), False)
    dense = q.qweight.dequantize()
    assert type(w.clone()) is torch.Tensor and torch.equal(w.clone(), dense)
    x = torch.randn(3, 64, requires_grad=True)
    torch.testing.assert_close(F.linear(x, w, q.bias), F.linear(x, dense, q.bias))
    (x @ w.T).sum().backward()  # gradients reach the input through the dequantized weight
    torch.testing.assert_close(x.grad, dense.sum(0).expand(3, -1))
    assert "DequantizedWeight(shape=(48, 64)" in repr(q.weight)
    with pytest.raises(AttributeError, match="set_weight"):
        q.weight = torch.zeros(48, 64)
    with torch.no_grad():  # writes would land in a temporary copy: refused, not lost
        for write in (lambda: q.weight.mul_(2), lambda: q.weight.copy_(dense),
                      lambda: q.weight.__setitem__(0, 0.0), lambda: q.weight.data.zero_(),
                      lambda: torch.add(dense, 1, out=q.weight)):
            with pytest.raises(RuntimeError, match="read-only"):
                write()
        y = torch.zeros(48, 64)
        y.add_(q.weight)  # reading it into another tensor is fine
    assert torch.equal(y, dense) and torch.equal(q.qweight.dequantize(), dense)
    assert w.numpy().shape == (48, 64) and len(w.tolist()) == 48
    assert torch.equal(copy.deepcopy(w), dense)
    other = QuantLinear.from_float(lin, spec)
    assert w.data_ptr() == q.weight_packed.data_ptr() != other.weight.data_ptr()
    assert q.to(torch.bfloat16).weight.dtype == torch.bfloat16  # the compute dtype


def test_embedding_and_conv_weights_read_as_their_dequantized_tables() -> None:
    torch.manual_seed(0)
    emb = QuantEmbedding(nn.Embedding(20, 16), "w8")
    ids = torch.tensor([3, 7])
    torch.testing.assert_close(emb.weight[ids], emb(ids))
    conv = QuantConv2d(nn.Conv2d(3, 8, 3), "w8")
    assert conv.weight.shape == (8, 3, 3, 3)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(F.conv2d(x, conv.weight, conv.bias), conv(x))
    assert conv.weight_nbytes < 8 * 27 * 4  # no float copy was attached to the module
    assert "weight" not in conv.state_dict()
    # nn.Embedding's / nn.Conv2d's attributes, as model code reads them (Whisper: num_embeddings)
    assert (emb.num_embeddings, emb.embedding_dim, emb.padding_idx) == (20, 16, None)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (3, 8, (3, 3))
    empty = QuantConv2d.empty_like(nn.Conv2d(3, 8, 3), conv.spec, torch.float32, device="meta")
    assert (empty.kernel_size, empty.groups, empty.bias.shape) == ((3, 3), 1, (8,))


def test_models_that_read_their_layers_weights_run_quantized() -> None:
    from transformers import T5Config, T5ForConditionalGeneration, ViTConfig, ViTModel

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, image_size=16, patch_size=8)).eval()
    pixels = torch.randn(1, 3, 16, 16)
    before = vit(pixels).last_hidden_state
    lowbit.quantize(vit, "w8")  # the patch projection (a Conv2d) is read as .weight.dtype
    assert isinstance(vit.embeddings.patch_embeddings.projection, QuantConv2d)
    torch.testing.assert_close(vit(pixels).last_hidden_state, before, atol=0.1, rtol=0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=32, d_ff=64, num_layers=1,
                                             num_heads=2, d_kv=16, decoder_start_token_id=0))
    ids = torch.randint(0, 50, (1, 6))
    before = t5.eval()(input_ids=ids, decoder_input_ids=ids).logits
    lowbit.quantize(t5, "w8")  # T5's feed-forward checks isinstance(wo.weight, Tensor).dtype
    after = t5(input_ids=ids, decoder_input_ids=ids).logits
    assert after.shape == before.shape and (after - before).abs().max() < 0.1
