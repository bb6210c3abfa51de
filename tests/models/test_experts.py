"""Fused MoE experts split into per-expert Linears: same outputs, quantized, saved and loaded."""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit.models.experts import (
    LinearExperts,
    calibrating_experts,
    fuse_experts,
    fused_experts,
    unfuse_experts,
)
from lowbit.nn.modules import QuantLinear
from lowbit.quant import fake_quantize
from lowbit.spec import as_spec

transformers = pytest.importorskip("transformers")
from transformers.integrations.moe import use_experts_implementation  # noqa: E402

warnings.filterwarnings("ignore", module="transformers")

SMALL = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def tiny_moe(kind: str = "mixtral", **overrides) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mixtral":
        config = transformers.MixtralConfig(**{**SMALL, "intermediate_size": 128,
                                               "num_local_experts": 4, **overrides})
        model = transformers.MixtralForCausalLM(config)
    elif kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**{**SMALL, "num_experts": 4,
                                                "num_experts_per_tok": 2,
                                                "moe_intermediate_size": 64, **overrides})
        model = transformers.Qwen3MoeForCausalLM(config)
    else:  # gpt-oss: [E, in, out] experts with biases, interleaved gate / up, clamped SwiGLU
        config = transformers.GptOssConfig(**{**SMALL, "intermediate_size": 64,
                                              "num_local_experts": 4, "num_experts_per_tok": 2,
                                              "head_dim": 16, **overrides})
        model = transformers.GptOssForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # gpt-oss: non-zero biases
                p.uniform_(-0.1, 0.1)
            elif p.dim() > 1:
                p.normal_(0, 0.05)
    model.set_experts_implementation("eager")
    return model.eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_unfused_experts_compute_what_the_fused_eager_forward_does(kind: str) -> None:
    model = tiny_moe(kind)
    before = logits(model, IDS)
    fused = fused_experts(model)
    assert list(fused) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    n_params = sum(p.numel() for p in model.parameters())
    assert unfuse_experts(model) == list(fused)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, LinearExperts) and experts.num_experts == 4
    up = experts.get_submodule("2.gate_up_proj")
    assert type(up) is nn.Linear and up.weight.is_contiguous()
    assert sum(p.numel() for p in model.parameters()) == n_params  # moved, nothing dropped
    after = logits(model, IDS)
    if kind == "gpt_oss":  # its eager forward adds the bias in another order
        torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    else:
        assert torch.equal(after, before)
    for tokens in ("all", "routed"):  # calibration modes: the same outputs
        with calibrating_experts(model, tokens):
            torch.testing.assert_close(logits(model, IDS), after, rtol=0, atol=1e-5)
    assert experts.calibrating is None
    assert unfuse_experts(model) == []  # nothing fused is left


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_every_layout_matches_transformers_batched_experts(transposed: bool, gated: bool):
    """Against transformers' own batched_mm implementation, for each layout flag."""

    @use_experts_implementation(is_transposed=transposed, has_bias=True, has_gate=gated)
    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts, hidden, inner = 3, 8, 6
            up = ("gate_up_proj", 2 * inner) if gated else ("up_proj", inner)
            shape_up = (3, hidden, up[1]) if transposed else (3, up[1], hidden)
            shape_down = (3, inner, hidden) if transposed else (3, hidden, inner)
            setattr(self, up[0], nn.Parameter(torch.randn(shape_up)))
            setattr(self, up[0] + "_bias", nn.Parameter(torch.randn(3, up[1])))
            self.down_proj = nn.Parameter(torch.randn(shape_down))
            self.down_proj_bias = nn.Parameter(torch.randn(3, hidden))
            self.act_fn = nn.SiLU()

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("batched_mm is configured")

    torch.manual_seed(0)
    fused = Experts(types.SimpleNamespace(_experts_implementation="batched_mm"))
    x = torch.randn(10, 8)
    index = torch.randint(0, 3, (10, 2))
    weights = torch.rand(10, 2)
    with torch.no_grad():
        want = fused(x, index, weights)
        got = LinearExperts(fused)(x, index, weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_quantize_splits_and_quantizes_the_experts_as_linears() -> None:
    model = tiny_moe("qwen3_moe")
    reference = copy.deepcopy(model)
    lowbit.quantize(model, "w4g64", exclude=["lm_head", "*embed*"])
    names = {r.name for r in model.lowbit_summary.quantized}
    assert {f"model.layers.1.mlp.experts.{e}.{p}" for e in range(4)
            for p in ("gate_up_proj", "down_proj")} <= names
    assert any("2 fused MoE experts modules split" in n for n in model.lowbit_summary.notes)
    assert isinstance(model.model.layers[0].mlp.experts.get_submodule("3.down_proj"), QuantLinear)
    # the same as fake-quantizing each expert's float weights in the unfused float model
    unfuse_experts(reference)
    with torch.no_grad():
        for name, m in reference.named_modules():
            if type(m) is nn.Linear and name in names:
                m.weight.copy_(fake_quantize(m.weight, as_spec("w4g64")))
    torch.testing.assert_close(logits(model, IDS), logits(reference, IDS), rtol=1e-4, atol=1e-4)


def test_excluded_experts_stay_fused_and_partly_excluded_ones_stay_float(tmp_path) -> None:
    model = tiny_moe("mixtral")
    lowbit.quantize(model, "w8", include=["*layers.0.*"], exclude=["*.3.down_proj"])
    assert list(fused_experts(model)) == ["model.layers.1.mlp.experts"]  # nothing selected
    experts = model.model.layers[0].mlp.experts
    assert type(experts.get_submodule("3.down_proj")) is nn.Linear
    out = logits(model, IDS)
    lowbit.save(model, tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q")
    loaded.set_experts_implementation("eager")  # the fused layer's, as before saving
    assert torch.equal(logits(loaded, IDS), out)
    assert list(fused_experts(loaded)) == ["model.layers.1.mlp.experts"]
    assert type(loaded.model.layers[0].mlp.experts.get_submodule("3.down_proj")) is nn.Linear


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_quantized_experts_save_and_load_bit_for_bit(kind: str, tmp_path) -> None:
    model = tiny_moe(kind)
    lowbit.quantize(model, {"*down_proj": "w8", "*": "w4g64"}, exclude=["lm_head"])
    out = logits(model, IDS)
    lowbit.save(model, tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q")
    assert isinstance(loaded.model.layers[1].mlp.experts, LinearExperts)
    assert torch.equal(logits(loaded, IDS), out)


def test_calibration_reaches_experts_the_text_never_routes_to() -> None:
    """64 experts, top-1, 128 calibration tokens: most experts get no token; GPTQ's Hessians
    and static activation ranges still come from every token."""
    model = tiny_moe("mixtral", num_local_experts=64, num_experts_per_tok=1, num_hidden_layers=1)
    calib = torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(2))
    routed = set()
    probe = copy.deepcopy(model)
    unfuse_experts(probe)
    experts = probe.model.layers[0].mlp.experts
    for e in range(64):
        experts.get_submodule(f"{e}.down_proj").register_forward_hook(
            lambda m, i, o, e=e: routed.add(e))
    logits(probe, calib)
    assert len(routed) < 64  # some experts see no calibration token
    float_out = logits(model, IDS)
    gptq = lowbit.quantize(copy.deepcopy(model), "w4g64", algorithm="gptq", calib=calib,
                           exclude=["lm_head"])
    errors = [r.error for r in gptq.lowbit_summary.quantized if ".experts." in r.name]
    assert len(errors) == 128 and all(e is not None and e < 0.2 for e in errors)
    assert any("every calibration token" in n for n in gptq.lowbit_summary.notes)
    static = lowbit.quantize(copy.deepcopy(model), "w8a8-static", calib=calib,
                             exclude=["lm_head"])
    never = min(set(range(64)) - routed)
    scale = static.model.layers[0].mlp.experts.get_submodule(f"{never}.down_proj").input_scale
    assert float(scale) != 1.0  # calibrated, not the placeholder
    for q in (gptq, static):  # (top-1 of 64 random experts: routing flips dominate errors)
        rel = (logits(q, IDS) - float_out).norm() / float_out.norm()
        assert rel < 0.5


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_the_folder_path_reads_moe_checkpoints_expert_by_expert(kind: str, tmp_path) -> None:
    """Mixtral stores w1 / w3 / w2 per expert under block_sparse_moe, Qwen3-MoE gate / up /
    down per expert, gpt-oss fused [E, in, out] tensors with biases: each is read one expert
    at a time and quantizes exactly as the model loaded whole."""
    from lowbit.models.hf import load_hf_model

    tiny_moe(kind).save_pretrained(tmp_path / "moe")
    whole, _, _ = load_hf_model(tmp_path / "moe")
    in_memory = lowbit.quantize(whole, "w4g64", exclude=["lm_head"])
    from_disk = lowbit.quantize(tmp_path / "moe", "w4g64", exclude=["lm_head"])
    assert "memory bounded: blocks were read from disk one at a time" in (
        from_disk.lowbit_summary.notes)
    assert any("2 fused MoE experts modules split" in n for n in from_disk.lowbit_summary.notes)
    assert torch.equal(logits(from_disk, IDS), logits(in_memory, IDS))


def test_mixed_precision_measures_and_plans_each_expert() -> None:
    model = tiny_moe("qwen3_moe")
    calib = torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(3))
    plan = lowbit.mixed_precision(copy.deepcopy(model), ["w4g64", "w8"], bits=6, calib=calib,
                                  exclude=["lm_head"])
    assert "model.layers.1.mlp.experts.3.down_proj" in plan.choice
    q = lowbit.quantize(copy.deepcopy(model), plan.specs)
    assert {r.name for r in q.lowbit_summary.quantized} == set(plan.choice)


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_float_experts_fuse_back_exactly(kind: str) -> None:
    model = tiny_moe(kind)
    before = {n: p.clone() for n, p in model.named_parameters()}
    names = unfuse_experts(model)
    fuse_experts(model, names)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert list(fused_experts(model)) == names
    unfuse_experts(model)
    lowbit.quantize(model, "w8", include=["*experts.1.*"])
    out = logits(model, IDS)
    with pytest.raises(ValueError, match=r"\[.1.gate_up_proj.,.*quantized; only float experts"):
        fuse_experts(model, names)
    assert torch.equal(logits(model, IDS), out)  # left as it was


def test_measuring_sensitivity_leaves_the_float_model_fused(tmp_path) -> None:
    from lowbit.calib import measure_sensitivity

    model = tiny_moe("mixtral")
    before = logits(model, IDS)
    sens = measure_sensitivity(model, ["w8", "w4g64"], torch.randint(0, 100, (2, 16)),
                               calib_samples=2, calib_seq_len=16)
    assert "model.layers.0.mlp.experts.2.down_proj" in {layer.name for layer in sens.layers}
    assert list(fused_experts(model)) == ["model.layers.0.mlp.experts",
                                          "model.layers.1.mlp.experts"]
    assert torch.equal(logits(model, IDS), before)
    model.save_pretrained(tmp_path / "f")  # transformers' own format, readable again
    again = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "f").eval()
    again.set_experts_implementation("eager")
    assert torch.equal(logits(again, IDS), before)


def test_patterns_naming_the_fused_module_get_a_hint() -> None:
    with pytest.raises(ValueError, match=r"split Linears, like 'model\.layers\.0\.mlp\.experts"
                                         r"\.0\.gate_up_proj'"):
        lowbit.quantize(tiny_moe("mixtral"), "w8", include=["*.mlp.experts"])


def test_fused_experts_lowbit_cannot_split_are_named_in_the_summary() -> None:
    torch.manual_seed(0)
    config = transformers.Llama4TextConfig(**SMALL, head_dim=16, intermediate_size=32,
                                           intermediate_size_mlp=64, num_local_experts=4)
    model = transformers.Llama4ForCausalLM(config).eval()
    lowbit.quantize(model, "w8")
    note = next(n for n in model.lowbit_summary.notes if "3+ dims" in n)
    assert note.startswith("4 float tensors") and "feed_forward.experts.gate_up_proj" in note


def test_the_folder_path_skips_layers_the_config_does_not_build_and_refuses_unselected(
        tmp_path) -> None:
    """A checkpoint with one more MoE layer than config.json builds (DeepSeek-V3's multi-token
    prediction layer ships so) is read like transformers reads it; experts no pattern selects
    are fused back, as the model loaded whole keeps them."""
    import json

    from lowbit.models.hf import load_hf_model

    tiny_moe("mixtral", num_hidden_layers=3).save_pretrained(tmp_path / "moe")
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (tmp_path / "moe" / "config.json").write_text(json.dumps(config))
    whole, _, _ = load_hf_model(tmp_path / "moe")
    kwargs = dict(exclude=["lm_head", "*layers.1.mlp.experts*"])
    in_memory = lowbit.quantize(whole, "w8", **kwargs)
    from_disk = lowbit.quantize(tmp_path / "moe", "w8", **kwargs)
    assert list(fused_experts(from_disk)) == ["model.layers.1.mlp.experts"]
    assert isinstance(from_disk.model.layers[0].mlp.experts, LinearExperts)
    assert any("1 fused MoE experts modules split" in n for n in from_disk.lowbit_summary.notes)
    assert torch.equal(logits(from_disk, IDS), logits(in_memory, IDS))
    with pytest.raises(ValueError, match="split Linears, like 'model.layers.0.mlp.experts.0"):
        lowbit.quantize(tmp_path / "moe", "w8", include=["*.mlp.experts"])


def test_routed_calibration_uses_each_experts_own_tokens_and_names_starved_experts() -> None:
    model = tiny_moe("mixtral")
    calib = torch.randint(0, 100, (4, 64), generator=torch.Generator().manual_seed(4))
    kwargs = dict(algorithm="gptq", calib=calib, exclude=["lm_head"])
    every = lowbit.quantize(copy.deepcopy(model), "w4g64", **kwargs)
    routed = lowbit.quantize(copy.deepcopy(model), "w4g64", moe_calibration="routed", **kwargs)
    assert any("calibrated on the tokens routed to them" in n for n in routed.lowbit_summary.notes)
    assert not torch.equal(logits(every, IDS), logits(routed, IDS))
    sparse = tiny_moe("mixtral", num_local_experts=64, num_experts_per_tok=1,
                      num_hidden_layers=1)
    with pytest.raises(ValueError, match="moe_calibration='routed' an expert the calibration"):
        lowbit.quantize(sparse, "w4g64", moe_calibration="routed", **kwargs)
    with pytest.raises(ValueError, match="moe_calibration='sometimes'; allowed: 'all', 'routed'"):
        lowbit.quantize(model, "w8", moe_calibration="sometimes")


def test_routed_calibration_over_many_batches_matches_the_re_run_path(monkeypatch) -> None:
    """One calibration sequence per batch: experts missing from the first batch are still
    called (with no rows) in every batch, so the staged forward and the re-run per group
    (documented to give the same statistics) quantize every expert the same."""
    import lowbit.calib.sequential as sequential

    model = tiny_moe("mixtral", num_local_experts=8, num_experts_per_tok=1, num_hidden_layers=1)
    calib = torch.randint(0, 100, (16, 16), generator=torch.Generator().manual_seed(7))

    def experts(staged: bool) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(sequential, "STAGED_MAX_BATCHES", 64 if staged else 0)
        q = lowbit.quantize(copy.deepcopy(model), "w4g64", algorithm="gptq", calib=calib,
                            exclude=["lm_head"], moe_calibration="routed", calib_batch_size=1,
                            calib_seq_len=16)
        return {n: t for n, t in q.state_dict().items() if ".experts." in n}

    staged, rerun = experts(True), experts(False)
    assert staged.keys() == rerun.keys() and len(staged) > 0
    assert all(torch.equal(staged[n], rerun[n]) for n in staged)


def test_expert_shapes_the_config_does_not_build_fail_in_one_line(tmp_path) -> None:
    import json

    tiny_moe("mixtral").save_pretrained(tmp_path / "moe")
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    config["intermediate_size"] = 64  # the checkpoint's experts are 128 wide
    (tmp_path / "moe" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"experts.0.gate_up_proj.weight' is \[256, 64\] in the "
                                         r"checkpoint but config.json builds \[128, 64\]"):
        lowbit.quantize(tmp_path / "moe", "w8")
