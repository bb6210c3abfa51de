"""Layer-by-layer calibration (lowbit.calib.sequential) through lowbit.quantize."""

from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.algorithms import GPTQ, LayerStats
from lowbit.calib.sequential import find_blocks, relative_error
from lowbit.eval import compare_logits
from lowbit.nn import QuantLinear

transformers = pytest.importorskip("transformers")

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
LM_PATH = SHARED / "models" / "llama-3m-shakespeare-mix"
VAL_TEXT = SHARED / "data" / "shakespeare-mix-val.txt"
TEST_TEXT = SHARED / "data" / "shakespeare-mix-test.txt"


@pytest.fixture(scope="module")
def lm():
    """(load float model, calibration ids [4, 256] from val, test ids [2048]) of the 3M LM."""
    if not (LM_PATH / "config.json").exists() or not VAL_TEXT.exists() or not TEST_TEXT.exists():
        pytest.skip(f"fixture LM or text absent ({LM_PATH}, {VAL_TEXT}, {TEST_TEXT})")
    tok = transformers.AutoTokenizer.from_pretrained(LM_PATH)
    calib = tok(VAL_TEXT.read_text(encoding="utf-8")[:8000], return_tensors="pt").input_ids
    test = tok(TEST_TEXT.read_text(encoding="utf-8")[:16000], return_tensors="pt").input_ids

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(LM_PATH, dtype=torch.float32)

    return load, calib[0, :1024].reshape(4, 256), test[0, :2048]


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=96,
                                     n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def gpt2_calib(n: int = 6, t: int = 48) -> torch.Tensor:
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(1))


def test_find_blocks_llama_gpt2_bert(lm):
    load, _, _ = lm
    assert find_blocks(load())[0] == "model.layers"
    assert find_blocks(tiny_gpt2())[0] == "transformer.h"
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=50))
    assert find_blocks(bert)[0] == "encoder.layer"
    assert find_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4))) is None


def test_gptq_beats_rtn_on_fixture_and_reports_errors(lm):
    load, calib, test = lm
    reference = load()
    kl = {}
    for algorithm in ("rtn", "gptq"):
        model = lowbit.quantize(load(), "w3g128", algorithm=algorithm,
                                calib=calib if algorithm == "gptq" else None,
                                exclude=["lm_head", "*embed*"])
        kl[algorithm] = compare_logits(model, reference, test, context=256,
                                                   stride=256).kl_mean
        if algorithm == "gptq":
            summary = model.lowbit_summary
            errors = [m.error for m in summary.quantized]
            assert len(errors) == 4 * 7 and all(e is not None and 0 < e < 1 for e in errors)
            assert any("layer by layer over 4 blocks" in n for n in summary.notes)
            assert isinstance(model.model.layers[3].mlp.down_proj, QuantLinear)
    assert kl["gptq"] < 0.9 * kl["rtn"], kl


def test_each_block_is_quantized_with_stats_of_the_quantized_prefix(lm):
    """Block 1's GPTQ weights equal GPTQ with Hessians collected in a model whose block 0 is
    the quantized one and whose block 1 is still float."""
    load, calib, _ = lm
    quantized = lowbit.quantize(load(), "w4g128", algorithm=GPTQ(sequential=False),
                                calib=calib, include=["model.layers.[01].*"])
    hybrid = load()
    hybrid.model.layers[0] = quantized.model.layers[0]
    names = ["self_attn.q_proj", "mlp.down_proj"]
    stats = {n: LayerStats() for n in names}
    block = hybrid.model.layers[1]
    hooks = [block.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: stats[n].update(a[0])) for n in names]
    with torch.no_grad():
        for batch in calib.split(8):
            hybrid(batch, use_cache=False)
    for h in hooks:
        h.remove()
    for n in names:
        weight = block.get_submodule(n).weight.detach()
        expected = GPTQ().quantize_weight(weight, lowbit.preset("w4g128"), stats[n])
        got = quantized.model.layers[1].get_submodule(n).qweight
        torch.testing.assert_close(got.dequantize(), expected.dequantize(), rtol=0, atol=1e-6)


def test_sequential_in_block_takes_later_stats_through_the_quantized_earlier_linears(lm):
    """With GPTQ(sequential=True) (the default), down_proj's Hessian comes from a block whose
    q/k/v, o and gate/up are already quantized (computing with their dequantized weights);
    without it, from the float block."""
    load, calib, _ = lm
    quantized = lowbit.quantize(load(), "w4g128", algorithm="gptq", calib=calib,
                                include=["model.layers.0.*"])
    hybrid = load()
    block, qblock = hybrid.model.layers[0], quantized.model.layers[0]
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj"):
        parent, _, child = name.rpartition(".")
        dequantized = torch.nn.Linear(block.get_submodule(name).in_features,
                                      block.get_submodule(name).out_features, bias=False)
        dequantized.weight.data = qblock.get_submodule(name).qweight.dequantize(torch.float32)
        setattr(block.get_submodule(parent), child, dequantized)
    stats = LayerStats()
    down = block.mlp.down_proj
    hook = down.register_forward_pre_hook(lambda m, a: stats.update(a[0]))
    with torch.no_grad():
        for batch in calib.split(8):
            hybrid(batch, use_cache=False)
    hook.remove()
    expected = GPTQ().quantize_weight(down.weight.detach(), lowbit.preset("w4g128"), stats)
    got = qblock.mlp.down_proj.qweight
    torch.testing.assert_close(got.dequantize(), expected.dequantize(), rtol=0, atol=1e-6)


def test_memory_bounded_path_equals_in_memory(lm):
    load, calib, _ = lm
    chosen = ["model.layers.1.*", "lm_head", "*embed*"]
    from_disk = lowbit.quantize(str(LM_PATH), "w4g128", algorithm="gptq", calib=calib,
                                include=chosen)
    in_memory = lowbit.quantize(load(), "w4g128", algorithm="gptq", calib=calib, include=chosen)
    a, b = from_disk.state_dict(), in_memory.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert "memory bounded" in " ".join(from_disk.lowbit_summary.notes)
    assert not any(p.is_meta for p in from_disk.parameters())
    assert not any(t.is_meta for t in from_disk.buffers())


def test_gpt2_conv1d_sharded_tied_from_disk(tmp_path):
    model = tiny_gpt2()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    calib = gpt2_calib()
    spec = {"lm_head": None, "transformer.wte": None, "*": "w4g64"}
    from_disk = lowbit.quantize(str(tmp_path), spec, algorithm="gptq", calib=calib)
    in_memory = lowbit.quantize(tiny_gpt2(), spec, algorithm="gptq", calib=calib)
    assert from_disk.lm_head.weight.data_ptr() == from_disk.transformer.wte.weight.data_ptr()
    a, b = from_disk.state_dict(), in_memory.state_dict()
    for k in b:
        assert torch.equal(a[k], b[k]), k
    c_attn = from_disk.transformer.h[1].attn.c_attn
    assert isinstance(c_attn, QuantLinear) and c_attn.weight_logical_shape == (192, 64)
    with torch.no_grad():
        assert torch.isfinite(from_disk(calib).logits).all()


def test_calibration_algorithm_without_calib_is_refused():
    with pytest.raises(ValueError, match="'gptq' needs calibration data"):
        lowbit.quantize(tiny_gpt2(), "w4g64", algorithm="gptq")


def test_too_few_tokens_says_how_many():
    with pytest.raises(ValueError, match=r"gives 20 tokens; gptq needs at least 256"):
        lowbit.quantize(tiny_gpt2(), "w4g64", algorithm="gptq", calib=gpt2_calib(2, 10))


def test_nan_mid_run_names_the_layer_and_leaves_the_model_as_it_was():
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[1].ln_2.weight[3] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"input of layer 'transformer.h.1.mlp.c_fc'"):
        lowbit.quantize(model, "w4g64", algorithm="gptq", calib=gpt2_calib())
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert not any(type(m).__name__ == "_StandIn" for m in model.modules())  # staged run undone
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before if "ln_2" not in k)


def test_relative_error_from_hessian_equals_direct():
    torch.manual_seed(0)
    x = torch.randn(300, 16)
    w, q = torch.randn(8, 16), torch.randn(8, 16)
    stats = LayerStats()
    stats.update(x)
    direct = float((x @ (w - q).t()).norm() / (x @ w.t()).norm())
    assert relative_error(w, q, stats, None) == pytest.approx(direct, rel=1e-4)
    assert relative_error(w, q, None, [x]) == pytest.approx(direct, rel=1e-4)


def test_hqq_without_calibration_from_disk_streams_blocks(lm):
    load, _, _ = lm
    from_disk = lowbit.quantize(str(LM_PATH), "w4g128", algorithm="hqq", include=["*.0.mlp.*"])
    in_memory = lowbit.quantize(load(), "w4g128", algorithm="hqq", include=["*.0.mlp.*"])
    a, b = from_disk.state_dict(), in_memory.state_dict()
    for k in b:
        assert torch.equal(a[k], b[k]), k


def test_calibration_batch_size_changes_memory_not_the_statistics():
    """GPTQ with one sequence per forward sees the same Hessians as with all of them at once
    (up to float summation order), so the quantized layers agree to rounding."""
    calib = gpt2_calib()
    results = []
    for batch_size in (1, 6):
        model = lowbit.quantize(tiny_gpt2(), "w4g64", algorithm="gptq",
                                calib=calib, calib_batch_size=batch_size)
        results.append(model.transformer.h[0].mlp.c_fc)
    one, all_at_once = (m.qweight.dequantize() for m in results)
    assert (one != all_at_once).float().mean() < 0.01  # at most a few codes flip at ties
    with pytest.raises(ValueError, match="batch_size"):
        lowbit.quantize(tiny_gpt2(), "w4g64", algorithm="gptq", calib=calib, calib_batch_size=0)


def _quantized_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.qweight.dequantize() for n, m in model.named_modules()
            if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("spec, batch_size", [("w3g128", 1), ("w3g128", 4), ("w4a8", 4)])
def test_staged_forward_equals_rerunning_the_block_per_group(lm, monkeypatch, spec, batch_size):
    """The one-forward staged run (batches paused before each group of linears) gives the
    statistics of re-running the block once per group: the same codes, with one or several
    calibration batches, and with activations quantized (w4a8) as the re-run's do."""
    import lowbit.calib.sequential as sq

    load, calib, _ = lm
    include = ["model.layers.0.*", "model.layers.1.*"]
    staged = lowbit.quantize(load(), spec, algorithm="gptq", calib=calib,
                             calib_batch_size=batch_size, include=include)
    monkeypatch.setattr(sq, "STAGED_MAX_INPUT_BYTES", 0)
    rerun = lowbit.quantize(load(), spec, algorithm="gptq", calib=calib,
                            calib_batch_size=batch_size, include=include)
    a, b = _quantized_weights(staged), _quantized_weights(rerun)
    assert set(a) == set(b) and len(a) == 14
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert not any(isinstance(m, sq._StandIn) for m in staged.modules())


def test_staged_forward_runs_each_block_once_per_batch(monkeypatch):
    """GPTQ's sequential calibration costs one block forward per batch (plus one to find the
    groups), where re-running per group costs one per group and batch plus the output pass."""
    import lowbit.calib.sequential as sq

    def count(limit: int) -> int:
        monkeypatch.setattr(sq, "STAGED_MAX_INPUT_BYTES", limit)
        model, calls = tiny_gpt2(), []
        handles = [b.register_forward_pre_hook(lambda m, a: calls.append(1))
                   for b in model.transformer.h]
        lowbit.quantize(model, "w4g64", algorithm="gptq", calib=gpt2_calib(6, 48),
                        calib_batch_size=2, exclude=["lm_head"])
        for h in handles:
            h.remove()
        return len(calls)

    blocks, batches, groups = 2, 3, 4  # GPT-2: c_attn, attn.c_proj, c_fc, mlp.c_proj
    setup = batches + 1  # capturing the first block's inputs (stopped there); finding groups
    assert count(1 << 30) == setup + blocks * batches
    assert count(0) == setup + blocks * batches * (groups + 1)


def test_staged_forward_falls_back_with_many_batches(monkeypatch):
    """More batches than STAGED_MAX_BATCHES (each paused forward holds a thread) re-run the
    block per group instead: the forward count of the re-run path."""
    import lowbit.calib.sequential as sq

    monkeypatch.setattr(sq, "STAGED_MAX_BATCHES", 2)
    model, calls = tiny_gpt2(), []
    for b in model.transformer.h:
        b.register_forward_pre_hook(lambda m, a: calls.append(1))
    lowbit.quantize(model, "w4g64", algorithm="gptq", calib=gpt2_calib(6, 48),
                    calib_batch_size=2, exclude=["lm_head"])
    blocks, batches, groups = 2, 3, 4
    assert len(calls) == batches + 1 + blocks * batches * (groups + 1)


def test_calibration_runs_in_eval_mode_and_puts_each_mode_back():
    """Dropout is off while calibrating (the result does not depend on the RNG); the model's
    modules get their own modes back."""
    results = []
    for seed in (1, 2):
        model = tiny_gpt2().train()
        model.transformer.h[0].eval()
        torch.manual_seed(seed)
        lowbit.quantize(model, "w4g64", algorithm="gptq", calib=gpt2_calib(), exclude=["lm_head"])
        assert model.training and not model.transformer.h[0].training
        results.append(_quantized_weights(model))
    expected = _quantized_weights(lowbit.quantize(tiny_gpt2(), "w4g64", algorithm="gptq",
                                                  calib=gpt2_calib(), exclude=["lm_head"]))
    for n in expected:
        assert torch.equal(results[0][n], expected[n]) and torch.equal(results[1][n], expected[n])


@pytest.mark.parametrize("spec, algorithm", [("w4g64", "gptq"), ("w8a8-static", "rtn")])
def test_calibration_the_model_cannot_take_is_refused_in_one_line(spec, algorithm):
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="calib sequences of 80 tokens exceed the model's 64 "
                                         "positions; lower calib_seq_len"):
        lowbit.quantize(model, spec, algorithm=algorithm, calib=gpt2_calib(t=80))
    with pytest.raises(ValueError, match=r"batch 0 holds token ids in \[3, 98\]; the "
                                         r"model's vocabulary is \[0, 96\)"):
        lowbit.quantize(model, spec, algorithm=algorithm, calib=gpt2_calib() + 3)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_a_model_without_weights_is_refused():
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=64, n_layer=1, n_head=2, vocab_size=96, n_positions=64))
    with pytest.raises(ValueError, match="'transformer.wte.weight' is on the meta device"):
        lowbit.quantize(model, "w8")


def test_a_group_that_does_not_divide_a_layer_is_named_before_calibrating():
    with pytest.raises(ValueError, match=r"layer 'transformer.h.0.attn.c_attn' \(Conv1D\): "
                                         "group_size=128 does not divide"):
        lowbit.quantize(tiny_gpt2(), "w4g128", algorithm="awq", calib=gpt2_calib(),
                        exclude=["*.wte", "*.wpe", "lm_head"])


def test_layer_by_layer_runs_leave_no_kernel_layouts_behind():
    model = lowbit.quantize(tiny_gpt2(), "w8a8", algorithm="gptq", calib=gpt2_calib(),
                            exclude=["lm_head"])
    caches = [m._kernel_cache for m in model.modules() if isinstance(m, QuantLinear)]
    assert caches and not any(caches)
