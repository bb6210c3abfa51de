from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.algorithms import AWQ, RTN, LayerStats, get_algorithm
from lowbit.algorithms.base import BlockContext
from lowbit.models.mappings import (
    MAPPINGS,
    fold_scales,
    linear_weight_2d,
    resolve_mappings,
)
from lowbit.spec import preset

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
LM_PATH = SHARED / "models" / "llama-3m-shakespeare-mix"
VAL_TEXT = SHARED / "data" / "shakespeare-mix-val.txt"


# ---- helpers: a BlockContext from a real model (what calib/sequential.py provides) ----
def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def collect_stats(model, block, batches) -> dict[str, LayerStats]:
    stats = {n: LayerStats() for n, m in block.named_modules() if _is_linear(m)}
    mods = dict(block.named_modules())
    hooks = [mods[n].register_forward_pre_hook(
        lambda _m, args, n=n: stats[n].update(args[0])) for n in stats]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in hooks:
        h.remove()
    return stats


def block_runner(model, block, batches):
    """Runs ``block`` alone on the inputs it received in one pass of ``model`` over ``batches``."""
    captured: list[tuple[tuple, dict]] = []
    h = block.register_forward_pre_hook(
        lambda _m, args, kwargs: captured.append((args, kwargs)), with_kwargs=True)
    with torch.no_grad():
        for ids in batches:
            model(ids)
    h.remove()

    def run() -> list[torch.Tensor]:
        with torch.no_grad():
            outs = [block(*args, **kwargs) for args, kwargs in captured]
        return [(o[0] if isinstance(o, tuple) else o).detach().clone() for o in outs]

    return run


def make_ctx(model, block, arch, batches, spec) -> BlockContext:
    return BlockContext(block=block, arch=arch, stats=collect_stats(model, block, batches),
                        spec_for=lambda _n: spec, run_block=block_runner(model, block, batches))


def logits(model, batches) -> torch.Tensor:
    """Final hidden states (the LM head is left out: it is the costliest part and folds nothing)."""
    with torch.no_grad():
        return torch.cat([model(ids)[0] for ids in batches])


@pytest.fixture(scope="module")
def llama():
    """(loader of the float32 fixture Llama, calibration batches of real text)."""
    if not (LM_PATH / "config.json").exists() or not VAL_TEXT.exists():
        pytest.skip(f"fixture LM or text absent ({LM_PATH}, {VAL_TEXT})")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(LM_PATH)
    ids = tok(VAL_TEXT.read_text(encoding="utf-8")[:20000], return_tensors="pt").input_ids
    batches = [ids[:, i * 128:(i + 1) * 128] for i in range(3)]

    def load():  # the decoder stack without the LM head
        return transformers.AutoModelForCausalLM.from_pretrained(LM_PATH,
                                                                 dtype=torch.float32).model

    return load, batches


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=97, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms so that folding into them is really tested
        for blk in model.transformer.h:
            for ln in (blk.ln_1, blk.ln_2):
                ln.weight.uniform_(0.5, 1.5)
                ln.weight[:3] *= 20  # outlier channels
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


# ---- mapping tables ----
def test_llama_table_names_exist_in_fixture_block(llama):
    load, _ = llama
    block = load().layers[0]
    names = dict(block.named_modules())
    for m in MAPPINGS["llama"]:
        for n in (m.prev, *m.nexts):
            assert n in names, n
    resolved, notes = resolve_mappings(block, "llama")
    # The fixture uses grouped-query attention (2 kv heads, 4 heads): v_proj -> o_proj can't fold.
    assert [r.prev_name for r in resolved] == [
        "input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    assert len(notes) == 1 and "self_attn.v_proj" in notes[0] and "grouped-query" in notes[0]


def test_llama_without_gqa_folds_v_into_o():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=50)
    block = transformers.LlamaForCausalLM(cfg).model.layers[0]
    resolved, notes = resolve_mappings(block, "llama")
    assert len(resolved) == 4 and notes == []


def test_gpt2_and_bert_tables_resolve():
    model, _ = tiny_gpt2()
    resolved, notes = resolve_mappings(model.transformer.h[0], "gpt2")
    assert notes == [] and [r.prev_name for r in resolved] == ["ln_1", "attn.c_attn", "ln_2"]
    assert resolved[1].channels == slice(128, 192)  # the v third of c_attn's outputs
    bert, _ = tiny_bert()
    resolved, notes = resolve_mappings(bert.encoder.layer[0], "bert")
    assert notes == [] and [r.prev_name for r in resolved] == ["attention.self.value"]


def test_unknown_arch_raises_and_bad_scales_rejected():
    with pytest.raises(ValueError, match="no scale-folding mapping for model_type 'mamba'"):
        resolve_mappings(nn.Linear(4, 4), "mamba")
    model, _ = tiny_gpt2()
    m = resolve_mappings(model.transformer.h[0], "gpt2")[0][0]
    with pytest.raises(ValueError, match="needs 64"):
        fold_scales(m, torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        fold_scales(m, torch.zeros(64))


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_random_scale_folding_keeps_outputs(arch):
    model, batches = tiny_gpt2() if arch == "gpt2" else tiny_bert()
    block = model.transformer.h[0] if arch == "gpt2" else model.encoder.layer[0]

    def out():
        with torch.no_grad():
            return torch.cat([model(ids)[0] for ids in batches])

    ref = out()
    g = torch.Generator().manual_seed(1)
    for m in resolve_mappings(block, arch)[0]:
        fold_scales(m, torch.rand(m.width, generator=g) * 4 + 0.25)
    torch.testing.assert_close(out(), ref, rtol=1e-4, atol=1e-4)


# ---- AWQ on a synthetic layer with outlier input channels ----
class _AttnInput(nn.Module):
    """The part of a Llama block AWQ's first mapping touches: a norm feeding q/k/v."""

    def __init__(self, d: int, out: int, g: torch.Generator) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(d, elementwise_affine=True, bias=False)
        self.self_attn = nn.Module()
        for n in ("q_proj", "k_proj", "v_proj"):
            lin = nn.Linear(d, out, bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(out, d, generator=g) * 0.05)
            setattr(self.self_attn, n, lin)

    def linears(self) -> list[nn.Linear]:
        return [self.self_attn.q_proj, self.self_attn.k_proj, self.self_attn.v_proj]


def _outlier_inputs(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=g)
    x[:, [3, 77, 140, 200]] *= 25.0  # a few salient channels, as in LLM activations
    return x


def _layer_error(layer: _AttnInput, x: torch.Tensor, ref: list[torch.Tensor], algo, spec) -> float:
    xs = x * layer.input_layernorm.weight.detach()  # the norm's (folded) scale, norm itself aside
    stats = LayerStats()
    stats.update(xs)
    err = 0.0
    for lin, y in zip(layer.linears(), ref, strict=True):
        w = algo.quantize_weight(lin.weight.detach(), spec, stats).dequantize()
        err += float(((xs @ w.t() - y) ** 2).sum())
    return err


@pytest.mark.parametrize("name", ["w4g128", "w3g128"])
@pytest.mark.parametrize("clip", [False, True])
def test_awq_beats_rtn_on_outlier_channels(name, clip):
    g = torch.Generator().manual_seed(0)
    d = 256
    layer = _AttnInput(d, 96, g)
    x_cal, x_test = _outlier_inputs(1024, d, g), _outlier_inputs(1024, d, g)
    ref = [x_test @ lin.weight.detach().t() for lin in layer.linears()]
    spec = preset(name)
    rtn = _layer_error(layer, x_test, ref, RTN(), spec)

    stats = LayerStats()
    stats.update(x_cal)
    ctx = BlockContext(block=layer, arch="llama",
                       stats={f"self_attn.{n}": stats for n in ("q_proj", "k_proj", "v_proj")},
                       spec_for=lambda _n: spec, run_block=lambda: [])
    notes = AWQ(clip=clip).prepare_block(ctx)
    assert any(n.startswith("input_layernorm -> ") and "alpha=" in n for n in notes), notes
    assert not torch.equal(layer.input_layernorm.weight, torch.ones(d))  # scales were folded
    awq = _layer_error(layer, x_test, ref, AWQ(clip=clip), spec)
    assert awq < 0.7 * rtn, (awq, rtn)


def test_awq_clip_search_never_increases_output_error():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 256, generator=g) * 0.05
    w[:, 5] *= 8
    x = _outlier_inputs(512, 256, g)
    stats = LayerStats()
    stats.update(x)
    for name in ("w4g128", "w3g128", "w2g64", "w8"):
        spec = preset(name)
        qt = AWQ().quantize_weight(w, spec, stats)
        assert qt.spec == spec
        err = float(((x @ (w - qt.dequantize()).t()) ** 2).sum())
        rtn = float(((x @ (w - RTN().quantize_weight(w, spec).dequantize()).t()) ** 2).sum())
        assert err <= rtn * (1 + 1e-5)
    # without statistics it is plain RTN
    assert torch.equal(AWQ().quantize_weight(w, spec).dequantize(),
                       RTN().quantize_weight(w, spec).dequantize())


# ---- AWQ on real blocks ----
def test_awq_folding_keeps_fixture_llama_output(llama):
    load, batches = llama
    model = load()
    ref = logits(model, batches)
    block = model.layers[0]
    before = [linear_weight_2d(m) for m in (block.self_attn.q_proj, block.mlp.down_proj)]
    notes = AWQ().prepare_block(make_ctx(model, block, "llama", batches, preset("w3g128")))
    assert any("grouped-query" in n for n in notes)
    after = [linear_weight_2d(m) for m in (block.self_attn.q_proj, block.mlp.down_proj)]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)), notes
    torch.testing.assert_close(logits(model, batches), ref, rtol=1e-3, atol=1e-3)


def test_awq_block_objective_beats_rtn_on_fixture_block(llama):
    load, batches = llama
    spec = preset("w3g128")
    model = load()
    block = model.layers[1]
    run = block_runner(model, block, batches)
    ref = run()

    def quantize_block(algo, stats):
        for name, m in block.named_modules():
            if isinstance(m, nn.Linear):
                w = algo.quantize_weight(m.weight.detach(), spec, stats[name]).dequantize()
                m.weight.data.copy_(w)

    saved = {k: v.clone() for k, v in block.state_dict().items()}
    quantize_block(RTN(), collect_stats(model, block, batches))
    err_rtn = sum(float(((o - r) ** 2).sum()) for o, r in zip(run(), ref, strict=True))
    block.load_state_dict(saved)

    algo = AWQ(objective="block", grid=5, clip=True)
    algo.prepare_block(make_ctx(model, block, "llama", batches, spec))
    torch.testing.assert_close(run(), ref, rtol=1e-3, atol=1e-3)  # folding alone changes nothing
    quantize_block(algo, collect_stats(model, block, batches))  # restat after prepare
    err_awq = sum(float(((o - r) ** 2).sum()) for o, r in zip(run(), ref, strict=True))
    assert err_awq < err_rtn, (err_awq, err_rtn)


def test_awq_gpt2_conv1d_folding_keeps_output():
    model, batches = tiny_gpt2()
    model = model.transformer
    ref = logits(model, batches)
    block = model.h[0]
    notes = AWQ(grid=5).prepare_block(make_ctx(model, block, "gpt2", batches, preset("w4g64")))
    assert len(notes) == 3, notes
    torch.testing.assert_close(logits(model, batches), ref, rtol=1e-4, atol=1e-4)


def test_awq_unknown_arch_falls_back_with_note():
    lin = nn.Linear(8, 8)
    w = lin.weight.detach().clone()
    ctx = BlockContext(block=lin, arch="mamba", stats={}, spec_for=lambda _n: preset("w4g128"),
                       run_block=lambda: [])
    notes = AWQ().prepare_block(ctx)
    assert notes == ["no AWQ mapping for model_type 'mamba': scales not applied, RTN with clip "
                     "search used"]
    assert torch.equal(lin.weight, w)


def test_awq_bad_arguments_and_missing_stats():
    assert isinstance(get_algorithm("awq"), AWQ)
    with pytest.raises(ValueError, match="grid=0"):
        AWQ(grid=0)
    with pytest.raises(ValueError, match="objective='x'"):
        AWQ(objective="x")
    with pytest.raises(ValueError, match="max_shrink"):
        AWQ(max_shrink=1.0)
    model, _ = tiny_gpt2()
    ctx = BlockContext(block=model.transformer.h[0], arch="gpt2", stats={},
                       spec_for=lambda _n: preset("w4g64"), run_block=lambda: [])
    with pytest.raises(ValueError, match="AWQ needs calibration statistics .* attn.c_attn"):
        AWQ().prepare_block(ctx)


def test_awq_through_lowbit_quantize_beats_rtn_on_gpt2():
    import lowbit

    errors = {}
    for name, algo in (("rtn", RTN()), ("awq", AWQ())):
        model, _ = tiny_gpt2()
        ids = torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(5))
        ref = logits(model, [ids])
        lowbit.quantize(model, "w4g64", algorithm=algo, calib=ids, exclude=["lm_head"])
        errors[name] = float(((logits(model, [ids]) - ref) ** 2).mean() / (ref**2).mean())
        if name == "awq":
            assert any(n.startswith("block 0: ln_1 -> attn.c_attn: alpha=")
                       for n in model.lowbit_summary.notes), model.lowbit_summary.notes
    assert errors["awq"] < 0.8 * errors["rtn"], errors
