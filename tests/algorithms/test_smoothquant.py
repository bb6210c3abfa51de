from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.algorithms import SmoothQuant, get_algorithm
from lowbit.algorithms.base import BlockContext, LayerStats
from lowbit.algorithms.smoothquant import smoothing_scales
from lowbit.models.mappings import linear_weight_2d
from lowbit.quant.maps import fake_quantize
from lowbit.spec import preset

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
LM_PATH = SHARED / "models" / "llama-3m-shakespeare-mix"
VAL_TEXT = SHARED / "data" / "shakespeare-mix-val.txt"


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def capture(model, block, batches) -> tuple[dict[str, LayerStats], dict[str, torch.Tensor]]:
    """Statistics and raw inputs ``[tokens, in]`` of every linear of ``block``."""
    mods = {n: m for n, m in block.named_modules() if _is_linear(m)}
    stats = {n: LayerStats() for n in mods}
    raw: dict[str, list[torch.Tensor]] = {n: [] for n in mods}

    def hook(name):
        def fn(_m, args):
            stats[name].update(args[0], hessian=False)
            raw[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        return fn

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in hooks:
        h.remove()
    return stats, {n: torch.cat(v) for n, v in raw.items()}


def outputs(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(ids)[0] for ids in batches])


def smooth(model, block, arch, batches, spec, algo=None) -> list[str]:
    stats, _ = capture(model, block, batches)
    ctx = BlockContext(block=block, arch=arch, stats=stats, spec_for=lambda _n: spec,
                       run_block=lambda: [])
    return (algo or SmoothQuant()).prepare_block(ctx)


def w8a8_error(x: torch.Tensor, w: torch.Tensor, spec) -> float:
    """Relative squared error of ``x W^T`` with weights and activations fake-quantized."""
    y = x @ w.t()
    yq = fake_quantize(x, spec.act) @ fake_quantize(w, spec).t()
    return float(((y - yq) ** 2).sum() / (y**2).sum())


def outlier_ratio(x: torch.Tensor) -> float:
    m = x.abs().amax(0)
    return float(m.max() / m.mean())


@pytest.fixture(scope="module")
def llama():
    if not (LM_PATH / "config.json").exists() or not VAL_TEXT.exists():
        pytest.skip(f"fixture LM or text absent ({LM_PATH}, {VAL_TEXT})")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(LM_PATH)
    ids = tok(VAL_TEXT.read_text(encoding="utf-8")[:12000], return_tensors="pt").input_ids
    batches = [ids[:, i * 128:(i + 1) * 128] for i in range(2)]

    def load():  # the decoder stack without the LM head
        return transformers.AutoModelForCausalLM.from_pretrained(LM_PATH,
                                                                 dtype=torch.float32).model

    return load, batches


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=97, n_positions=64)
    model = transformers.GPT2Model(cfg).eval()
    with torch.no_grad():
        for blk in model.h:
            for ln in (blk.ln_1, blk.ln_2):
                ln.weight.uniform_(0.5, 1.5)
                ln.weight[[2, 9, 40]] *= 30  # activation outlier channels, as in real LLMs
                ln.bias.normal_(0, 0.1)
    return model, [torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(i))
                   for i in range(2)]


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=97)
    model = transformers.BertModel(cfg).eval()
    return model, [torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(i))
                   for i in range(2)]


# ---- the float output is unchanged ----
@pytest.mark.parametrize("linear_pairs", [False, True])
def test_smoothing_keeps_fixture_llama_output(llama, linear_pairs):
    load, batches = llama
    model = load()
    ref = outputs(model, batches)
    block = model.layers[0]
    norm_before = block.input_layernorm.weight.detach().clone()
    notes = smooth(model, block, "llama", batches, preset("w8a8"),
                   SmoothQuant(alpha=0.5, fold_linear_pairs=linear_pairs))
    assert not torch.equal(block.input_layernorm.weight, norm_before)
    smoothed = [n for n in notes if "activation max/mean" in n]
    assert len(smoothed) == (3 if linear_pairs else 2), notes
    torch.testing.assert_close(outputs(model, batches), ref, rtol=1e-3, atol=1e-3)


def test_smoothing_keeps_gpt2_and_bert_outputs():
    gpt2, batches = tiny_gpt2()
    ref = outputs(gpt2, batches)
    notes = smooth(gpt2, gpt2.h[0], "gpt2", batches, preset("w8a8-static"))
    assert [n.split(":")[0] for n in notes] == ["ln_1 -> attn.c_attn", "ln_2 -> mlp.c_fc"]
    torch.testing.assert_close(outputs(gpt2, batches), ref, rtol=1e-4, atol=1e-4)

    bert, batches = tiny_bert()
    ref = outputs(bert, batches)
    block = bert.encoder.layer[0]
    # Post-LN BERT has no foldable norm -> linear pair: the default smooths nothing.
    before = {k: v.clone() for k, v in block.state_dict().items()}
    assert smooth(bert, block, "bert", batches, preset("w8a8")) == []
    assert all(torch.equal(v, before[k]) for k, v in block.state_dict().items())
    notes = smooth(bert, block, "bert", batches, preset("w8a8"),
                   SmoothQuant(fold_linear_pairs=True))
    assert notes[0].startswith("attention.self.value -> attention.output.dense")
    assert not torch.equal(block.attention.self.value.weight, before["attention.self.value.weight"])
    torch.testing.assert_close(outputs(bert, batches), ref, rtol=1e-4, atol=1e-4)


# ---- outliers move into the weights and W8A8 error drops ----
@pytest.mark.parametrize("name", ["w8a8", "w8a8-static"])
def test_smoothing_reduces_outliers_and_w8a8_error(name):
    model, batches = tiny_gpt2()
    block = model.h[0]
    spec = preset(name)
    _, raw = capture(model, block, batches)
    before = {n: (outlier_ratio(raw[n]), w8a8_error(raw[n], linear_weight_2d(m), spec))
              for n, m in (("attn.c_attn", block.attn.c_attn), ("mlp.c_fc", block.mlp.c_fc))}
    smooth(model, block, "gpt2", batches, spec)
    _, raw = capture(model, block, batches)  # the runner re-collects after prepare_block
    for n, m in (("attn.c_attn", block.attn.c_attn), ("mlp.c_fc", block.mlp.c_fc)):
        ratio, err = outlier_ratio(raw[n]), w8a8_error(raw[n], linear_weight_2d(m), spec)
        assert ratio < 0.5 * before[n][0], (n, ratio, before[n])
        assert err < 0.5 * before[n][1], (n, err, before[n])


def test_smoothing_reduces_fixture_llama_activation_range(llama):
    load, batches = llama
    model = load()
    block = model.layers[0]
    spec = preset("w8a8-static")
    _, raw = capture(model, block, batches)
    ratio0 = outlier_ratio(raw["self_attn.q_proj"])
    err0 = sum(w8a8_error(raw["self_attn.q_proj"], linear_weight_2d(getattr(block.self_attn, p)),
                          spec) for p in ("q_proj", "k_proj", "v_proj"))
    smooth(model, block, "llama", batches, spec)
    _, raw = capture(model, block, batches)
    ratio1 = outlier_ratio(raw["self_attn.q_proj"])
    err1 = sum(w8a8_error(raw["self_attn.q_proj"], linear_weight_2d(getattr(block.self_attn, p)),
                          spec) for p in ("q_proj", "k_proj", "v_proj"))
    assert ratio1 < ratio0 and err1 < err0, (ratio0, ratio1, err0, err1)


# ---- the formula, fallbacks and bad input ----
def test_smoothing_scales_formula():
    a = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothing_scales(a, w, 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 1.0, 1.0]))
    # alpha balances the ranges: max|x/s| == max|W s| where both are non-zero
    torch.testing.assert_close((a / s)[:2], (w * s)[:2])
    torch.testing.assert_close(smoothing_scales(a, w, 0.0)[:2], 1 / w[:2])


def test_unknown_arch_falls_back_and_bad_input():
    lin = nn.Linear(8, 8)
    w = lin.weight.detach().clone()
    ctx = BlockContext(block=lin, arch="mamba", stats={}, spec_for=lambda _n: preset("w8a8"),
                       run_block=lambda: [])
    assert SmoothQuant().prepare_block(ctx) == [
        "no SmoothQuant mapping for model_type 'mamba': activations not smoothed, plain W8A8 used"]
    assert torch.equal(lin.weight, w)
    with pytest.raises(ValueError, match="alpha=1.5"):
        SmoothQuant(alpha=1.5)
    algo = get_algorithm("smoothquant")
    assert isinstance(algo, SmoothQuant) and algo.restat_after_prepare and algo.needs_calibration
    gpt2, _ = tiny_gpt2()
    ctx = BlockContext(block=gpt2.h[0], arch="gpt2", stats={}, spec_for=lambda _n: preset("w8a8"),
                       run_block=lambda: [])
    with pytest.raises(ValueError, match="SmoothQuant needs activation ranges .* attn.c_attn"):
        SmoothQuant().prepare_block(ctx)
    # quantize_weight is RTN with the layer's spec
    qt = SmoothQuant().quantize_weight(w, preset("w8a8"))
    assert torch.equal(qt.dequantize(), fake_quantize(w, preset("w8a8")))


def test_smoothquant_through_lowbit_quantize_beats_plain_w8a8_static():
    import lowbit

    errors = {}
    for name in ("rtn", "smoothquant"):
        model, _ = tiny_gpt2()
        ids = torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(5))
        ref = outputs(model, [ids])
        lowbit.quantize(model, "w8a8-static", algorithm=name, calib=ids)
        errors[name] = float(((outputs(model, [ids]) - ref) ** 2).mean() / (ref**2).mean())
    assert errors["smoothquant"] < 0.5 * errors["rtn"], errors


def test_weight_only_specs_are_refused_with_the_algorithms_that_suit_them():
    import lowbit

    model, batches = tiny_gpt2()
    with pytest.raises(ValueError, match="every selected spec is weight-only .*'awq' or 'gptq'"):
        lowbit.quantize(model, "w4g64", algorithm="smoothquant", calib=torch.cat(batches),
                        exclude=["wte", "wpe"])
    gpt2, _ = tiny_gpt2()  # a block of weight-only specs alone: notes, no smoothing
    w = gpt2.h[0].attn.c_attn.weight.detach().clone()
    ctx = BlockContext(block=gpt2.h[0], arch="gpt2", stats={},
                       spec_for=lambda _n: preset("w4g64"), run_block=lambda: [])
    notes = SmoothQuant().prepare_block(ctx)
    assert "ln_1 -> attn.c_attn: not smoothed (uint4-g64-asym is weight-only)" in notes
    assert torch.equal(gpt2.h[0].attn.c_attn.weight, w)


@pytest.mark.parametrize("make, match", [
    (lambda: SmoothQuant(alpha="0.5"), r"alpha='0.5'; allowed: a number in \[0, 1\]"),
    (lambda: get_algorithm("hqq").__class__(iters=2.5), "iters=2.5; allowed: an int >= 1"),
    (lambda: get_algorithm("gptq").__class__(block=True), "block=True; allowed: an int >= 1"),
    (lambda: get_algorithm("gptq").__class__(damp=0), r"damp=0; allowed: a number in \(0, 1\)"),
])
def test_hyper_parameters_are_checked_when_made(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_mixed_precision_smooths_only_the_activation_quantizing_mappings():
    import lowbit

    model, batches = tiny_gpt2()
    lowbit.quantize(model, {"*mlp*": "w8", "*.h.0.*": "w8", "*": "w8a8-static"},
                    algorithm="smoothquant", calib=torch.cat(batches), exclude=["wte", "wpe"])
    notes = model.lowbit_summary.notes
    assert any("ln_2 -> mlp.c_fc: not smoothed (int8-ch-sym is weight-only)" in n for n in notes)
    assert any("ln_1 -> attn.c_attn: activation max/mean" in n for n in notes)
