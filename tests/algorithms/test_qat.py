"""QAT: STE and LSQ gradients against their formulas, convert() bit-exact, a short run learns."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms import qat
from lowbit.nn.modules import QuantEmbedding, QuantLinear
from lowbit.quant.maps import fake_quantize, qrange
from lowbit.spec import QuantSpec

FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "models" / "llama-3m-shakespeare-mix"
VAL_TEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare-mix-val.txt"


def _force_reference(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = "reference"


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 16))


def test_ste_gradient_is_one_inside_clip_range_zero_outside():
    spec = QuantSpec(format="int4", granularity="tensor", symmetric=True, scale_dtype="float32")
    layer = nn.Linear(8, 1, bias=False)
    q = qat.QATLinear(layer, spec, learn="fixed")
    with torch.no_grad():
        q.scale.fill_(0.25)  # code range [-8, 7] -> values [-2, 1.75]
        q.weight.copy_(torch.tensor([[-3.0, -2.0, -1.1, 0.0, 0.3, 1.7, 1.9, 5.0]]))
    q.fake_weight().sum().backward()
    inside = torch.tensor([[0.0, 1, 1, 1, 1, 1, 0, 0]])  # -2 -> v=-8 sits on qmin: passes
    assert torch.equal(q.weight.grad, inside)


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_scale_gradient_matches_paper_formula(symmetric: bool):
    fmt = "int3" if symmetric else "uint3"
    spec = QuantSpec(format=fmt, granularity="group", group_size=4, symmetric=symmetric,
                     scale_dtype="float32", zero_dtype="float32")
    torch.manual_seed(1)
    layer = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(2, 8))
    q = qat.QATLinear(layer, spec, learn="lsq")
    with torch.no_grad():
        q.scale.mul_(0.7)  # push some weights outside the clip range
    q.fake_weight().sum().backward()
    qmin, qmax = qrange(spec)
    w = q.weight.detach().reshape(2, 2, 4)
    s = q.scale.detach().unsqueeze(-1)
    z = q.zero_point.detach().unsqueeze(-1) if not symmetric else 0.0
    v = w / s + z
    r = v.round()
    # d w~/d s for w~ = (clamp(round(w/s + z)) - z) * s: -w/s + round(v) - z inside, qmin - z /
    # qmax - z at the clip ends (= LSQ's -v + round(v), qmin, qmax with v = w/s when z = 0).
    per_weight = torch.where(r < qmin, qmin - z, torch.where(r > qmax, qmax - z, r - v))
    g = 1 / math.sqrt(4 * qmax)
    expected = per_weight.sum(-1) * g
    assert q.scale.grad is not None
    torch.testing.assert_close(q.scale.grad, expected, rtol=1e-5, atol=1e-6)
    assert bool((r < qmin).any() | (r > qmax).any())  # the clip branch was exercised
    if not symmetric:
        assert q.zero_point.grad is None  # plain LSQ keeps the offset fixed


def test_lsq_plus_learns_the_offset():
    spec = QuantSpec(format="uint2", granularity="group", group_size=8)
    q = qat.QATLinear(nn.Linear(16, 4), spec, learn="lsq+")
    q.fake_weight().pow(2).sum().backward()
    assert q.zero_point.grad is not None and bool(q.zero_point.grad.abs().sum() > 0)


@pytest.mark.parametrize("spec", ["w2g64", "w4g64", "w8", QuantSpec(
    format="uint3", granularity="group", group_size=32, zero_point="float"), "int4-g32-sym-full"])
@pytest.mark.parametrize("learn", ["lsq", "lsq+", "fixed"])
def test_convert_equals_fake_quant_bit_for_bit(spec, learn):
    model = qat.prepare(_mlp(), spec, learn=learn)
    x = torch.randn(6, 128)
    opt = qat.make_optimizer(model, lr=1e-2, weight_lr=1e-3)
    for _ in range(3):  # move scales / zeros / weights off their initial values
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        fake = model(x)
    qat.convert(model)
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], QuantLinear)
    _force_reference(model)
    with torch.no_grad():
        assert torch.equal(model(x), fake)


def test_fresh_prepare_equals_ptq_rtn():
    """Before training, the fake-quant weight is exactly lowbit's fake_quantize (RTN)."""
    layer = _mlp()[0]
    q = qat.QATLinear(layer, lowbit.preset("w2g64"))
    with torch.no_grad():
        assert torch.equal(q.fake_weight(), fake_quantize(layer.weight, lowbit.preset("w2g64")))


def test_embedding_and_ptq_start():
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(50, 64), "lin": nn.Linear(64, 8)})
    ptq = lowbit.quantize(copy.deepcopy(model), "w4g64", algorithm="hqq", include=["lin"])
    prepared = qat.prepare(ptq, "w4g64")
    assert isinstance(prepared["lin"], qat.QATLinear)
    with torch.no_grad():  # starting from the PTQ result reproduces its weight
        assert torch.equal(prepared["lin"].fake_weight(), prepared["lin"].weight)
    model = qat.prepare(model, "w4g64")
    ids = torch.tensor([[1, 2, 49]])
    with torch.no_grad():
        fake = model["emb"](ids)
    qat.convert(model)
    assert isinstance(model["emb"], QuantEmbedding)
    with torch.no_grad():
        assert torch.equal(model["emb"](ids), fake)


def test_train_scales_only_freezes_everything_else():
    model = qat.prepare(_mlp(), "w2g64", train="scales")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.scale", "2.scale"}


def test_bad_inputs():
    with pytest.raises(ValueError, match="codebook"):
        qat.prepare(_mlp(), "nf4g64")
    with pytest.raises(ValueError, match="kmeans"):
        qat.prepare(_mlp(), "km4")
    with pytest.raises(ValueError, match="learn="):
        qat.prepare(_mlp(), "w2g64", learn="adam")
    with pytest.raises(ValueError, match="init="):
        qat.prepare(_mlp(), "w2g64", init="gptq")
    with pytest.raises(ValueError, match="train="):
        qat.prepare(_mlp(), "w2g64", train="bias")
    with pytest.raises(ValueError, match="no QAT modules"):
        qat.convert(_mlp())
    model = qat.prepare(_mlp(), "w2g64")
    opt = qat.make_optimizer(model)
    ids = torch.arange(100)
    with pytest.raises(ValueError, match="steps"):
        qat.train(model, ids, 0, opt)
    with pytest.raises(ValueError, match="shorter than one batch"):
        qat.train(model, ids, 5, opt, batch_size=4, seq_len=32)


class _TinyLM(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        return self.head(h + self.mlp(h))


def test_nan_loss_stops_before_the_update():
    model = qat.prepare(_TinyLM(), "w4g64", include=["mlp.*"])
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    before = model.mlp[0].scale.detach().clone()
    opt = qat.make_optimizer(model)
    with pytest.raises(qat.DivergedError, match="diverged"):
        qat.train(model, torch.randint(0, 32, (400,)), 3, opt, batch_size=2, seq_len=16)
    assert torch.equal(model.mlp[0].scale, before)


def test_short_qat_run_lowers_the_loss_on_the_fixture_lm():
    if not FIXTURE.is_dir() or not VAL_TEXT.is_file():
        pytest.skip(f"fixture model or text absent ({FIXTURE}, {VAL_TEXT})")
    from lowbit.models.hf import load_hf_model

    torch.manual_seed(0)
    model, tok, _ = load_hf_model(FIXTURE)
    ids = tok(VAL_TEXT.read_text(encoding="utf-8")[:60_000], return_tensors="pt").input_ids[0]
    model = qat.prepare(model, "w2g64", exclude=["lm_head", "*embed*"])
    probe = qat.sample_batch(ids, 8, 64, step=10_000, seed=1)
    with torch.no_grad():
        before = float(qat.qat_loss(model, probe))
    opt = qat.make_optimizer(model, lr=0.02, weight_lr=1e-4)
    qat.train(model, ids, 30, opt, batch_size=4, seq_len=64)
    with torch.no_grad():
        after = float(qat.qat_loss(model, probe))
    assert after < before - 0.05, (before, after)


@pytest.mark.parametrize("spec", ["w8", "w4g64"])
def test_conv2d_qat_trains_and_converts_bit_for_bit(spec):
    from lowbit.nn.modules import QuantConv2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 4, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 4))
    x = torch.randn(2, 4, 9, 9)
    qat.prepare(model, spec)
    assert isinstance(model[0], qat.QATConv2d)
    opt = qat.make_optimizer(model, lr=1e-2, weight_lr=1e-3)
    for _ in range(3):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert model[0].scale.grad is not None and model[0].weight.grad is not None
        opt.step()
    with torch.no_grad():
        fake = model(x)
    qat.convert(model)
    assert isinstance(model[0], QuantConv2d) and isinstance(model[2], QuantConv2d)
    with torch.no_grad():
        assert torch.equal(model(x), fake)


# ---- activation fake-quant (W*A* specs) ----------------------------------------------------
W8A8_ASYM_STATIC = QuantSpec(
    format="int8", granularity="channel", symmetric=True, scale_dtype="float32",
    act=QuantSpec(format="uint8", granularity="tensor", symmetric=False, scale_dtype="float32",
                  zero_dtype="float32", dynamic=False),
)


def _train_a_little(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    """A few steps towards the float MLP's outputs (a regression target, not zero: driving the
    output to zero would shrink the learned activation step to nothing)."""
    target = _mlp()(x).detach()
    opt = qat.make_optimizer(model, lr=0.02, weight_lr=1e-3)
    for _ in range(steps):
        loss = (model(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_dynamic_activation_fake_quant_uses_the_runtime_codes():
    """The fake-quant input is exactly lowbit's per-token Q^-1(Q(x)) under spec.act."""
    model = qat.prepare(_mlp(), "w8a8")
    x = torch.randn(5, 128) * 3
    spec = lowbit.preset("w8a8")
    with torch.no_grad():
        assert torch.equal(model[0].fake_input(x), fake_quantize(x, spec.act))
        assert not torch.equal(model[0].fake_input(x), x)


@pytest.mark.parametrize("spec", ["w8a8", "w8a8-static", W8A8_ASYM_STATIC])
@pytest.mark.parametrize("learn", ["lsq", "lsq+", "fixed"])
def test_activation_qat_converts_to_the_int8_modules(spec, learn):
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(5))
    model = qat.prepare(_mlp(), spec, learn=learn, calib=x)
    _train_a_little(model, x)
    with torch.no_grad():
        fake_first, fake = model[0](x), model(x)
    qat.convert(model)
    assert isinstance(model[0], QuantLinear) and model[0].spec.act is not None
    for kernel in ("reference", None):  # the integer oracle and the dispatched fast kernel
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.kernel = kernel
        with torch.no_grad():
            first, out = model[0](x), model(x)
        # first layer: same weight and activation codes, only the summation order differs
        torch.testing.assert_close(first, fake_first, rtol=1e-4,
                                   atol=1e-5 * float(fake_first.abs().max()))
        # later layers quantize inputs that differ by that rounding, so a code may flip at a tie
        assert float((out - fake).abs().max()) < 1e-2 * float(fake.abs().max())


def test_static_activation_scale_starts_from_calibration_and_learns():
    x = torch.randn(6, 128)
    model = qat.prepare(_mlp(), "w8a8-static", learn="lsq", calib=x)
    lin = model[0]
    assert math.isclose(float(lin.act_scale.detach()), float(x.abs().max()) / 127, rel_tol=1e-6)
    assert "calibrated with observer 'minmax'" in " ".join(model.lowbit_summary.notes)
    with torch.no_grad():
        lin.act_scale.mul_(0.5)  # clip half of the range: the clip branch of LSQ's gradient
    model(x).pow(2).mean().backward()
    assert lin.act_scale.grad is not None and float(lin.act_scale.grad.abs()) > 0
    assert any(p is lin.act_scale for p in qat.quant_parameters(model))
    before = float(lin.act_scale.detach())
    _train_a_little(model, x)
    assert float(lin.act_scale.detach()) != before
    frozen = qat.prepare(_mlp(), "w8a8-static", learn="fixed", calib=x)
    assert not frozen[0].act_scale.requires_grad


def test_scale_learning_rate_is_relative_to_the_scale():
    model = qat.prepare(_mlp(), "w8")
    opt = qat.make_optimizer(model, lr=0.02, weight_lr=1e-4)
    for group in opt.param_groups:
        (param,) = group["params"][:1]
        if param is model[0].scale:
            expected = 0.02 * float(param.detach().abs().mean())
            assert math.isclose(group["lr"], expected, rel_tol=1e-6)
    x = torch.randn(6, 128)
    _train_a_little(model, x, steps=5)  # an absolute 0.02 step would make int8 scales negative
    assert bool((model[0].scale > 0).all())


def test_activation_spec_checks():
    bad = QuantSpec(format="int8", granularity="channel", symmetric=True,
                    act=QuantSpec(format="fp8_e4m3fn", granularity="token", symmetric=True,
                                  dynamic=True))
    with pytest.raises(ValueError, match="integer"):
        qat.prepare(_mlp(), bad)
    with pytest.raises(ValueError, match="granularity='tensor', not 'token'"):
        lowbit.preset("w8a8").replace(act=lowbit.preset("w8a8").act.replace(dynamic=False))
    with pytest.raises(ValueError, match="pass calib"):
        qat.prepare(_mlp(), "w8a8-static")


def test_activation_spec_on_embedding_keeps_the_weight_part():
    lm = qat.prepare(_TinyLM(), "w8a8")
    assert lm.emb.spec.act is None and lm.head.spec.act is not None
    report = {m.name: m for m in lm.lowbit_summary.modules}
    assert "weight part of the spec only" in report["emb"].reason


def test_train_puts_modes_back_and_runs_the_teacher_in_eval_mode():
    torch.manual_seed(0)
    student = qat.prepare(_TinyLM(), "w4g64", include=["mlp.*"])
    teacher = _TinyLM().train()
    seen = []
    teacher.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    opt = qat.make_optimizer(student, lr=1e-2, weight_lr=1e-3)
    student.eval()
    qat.train(student, torch.randint(0, 32, (400,)), 2, opt, batch_size=2, seq_len=16,
              teacher=teacher)
    assert seen == [False, False] and teacher.training and not student.training
    with pytest.raises(qat.DivergedError):
        qat.train(student, torch.randint(0, 32, (400,)), 3, qat.make_optimizer(
            student, lr=float("nan"), weight_lr=float("nan")), batch_size=2, seq_len=16)
    assert not student.training


def test_prepare_refuses_a_selection_of_nothing_and_takes_one_pattern_as_a_string():
    model = _TinyLM()
    with pytest.raises(ValueError, match="no module left to train: 4 candidates"):
        qat.prepare(model, "w4g64", exclude=["*"])
    assert all(p.requires_grad for p in model.parameters())  # left as it was
    qat.prepare(model, "w4g64", exclude="head")
    assert isinstance(model.head, nn.Linear) and isinstance(model.mlp[0], qat.QATLinear)


def test_tiny_weights_keep_subnormal_scales_as_ptq_does():
    lin = nn.Linear(128, 4)
    with torch.no_grad():
        lin.weight.mul_(1e-3 / lin.weight.std())
    ptq = lowbit.nn.QuantLinear.from_float(lin, "w8").qweight.dequantize()
    model = qat.prepare(nn.Sequential(lin), "w8")
    torch.testing.assert_close(model[0].fake_weight().detach(), ptq, rtol=0, atol=0)


def test_prepare_keeps_the_linears_torch_attention_reads_in_float():
    layer = nn.TransformerDecoderLayer(d_model=64, nhead=4, dim_feedforward=128,
                                       batch_first=True)
    qat.prepare(layer, "w8")
    assert not isinstance(layer.self_attn.out_proj, qat.QATLinear)
    assert isinstance(layer.linear1, qat.QATLinear)
    x = torch.randn(2, 5, 64)
    qat.convert(layer)
    with torch.no_grad():
        assert layer.eval()(x, x).shape == (2, 5, 64)


def test_negative_scales_read_from_a_checkpoint_survive_prepare(tmp_path):
    """A full-range model exported to compressed-tensors comes back as plain int4-g32-sym with
    its negative scales; QAT must start from exactly that model."""
    from lowbit.tensor import QuantizedTensor

    model = lowbit.quantize(_mlp(), "q4_0")
    plain = lowbit.preset("q4_0").replace(full_range=False)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            qt = module.qweight
            module.spec = plain  # as lowbit.load builds it from the exported config
            module.set_weight(QuantizedTensor.from_float(qt.dequantize(), plain, qt.qparams))
            assert bool((module.qweight.scale < 0).any())
    x = torch.randn(5, 128)
    with torch.no_grad():
        before = model(x)
    qat.prepare(model, plain, learn="lsq")
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)
