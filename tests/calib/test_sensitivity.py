"""Mixed precision by measurement: per-layer damage and the allocation under a budget."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.calib import sensitivity as sens_mod
from lowbit.calib.sensitivity import (
    LayerSensitivity,
    Sensitivity,
    allocate_bits,
    measure_sensitivity,
    mixed_precision,
)
from lowbit.spec import as_spec

transformers = pytest.importorskip("transformers")

CANDIDATES = ["w2g64", "w4g128", "w8"]


def _tiny_llama(layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def _ids(n: int = 4, t: int = 24) -> torch.Tensor:
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(1))


def _table(rows: dict[str, tuple[int, dict[str, tuple[int, float]]]]) -> Sensitivity:
    specs = [as_spec(c) for c in CANDIDATES]
    keys = [str(s) for s in specs]
    layers = [LayerSensitivity(name, "Linear", n, {k: v[0] for k, v in zip(keys, opts.values(),
                                                                          strict=True)},
                               {k: v[1] for k, v in zip(keys, opts.values(), strict=True)})
              for name, (n, opts) in rows.items()]
    return Sensitivity(specs, layers, "kl", 1, 10)


def _uniform(n: int, damage: tuple[float, float, float]) -> tuple[int, dict]:
    """A layer of ``n`` weights at 2, 4 and 8 bits per weight with the given damages."""
    return n, {c: (n * b // 8, d) for c, b, d in zip(CANDIDATES, (2, 4, 8), damage, strict=True)}


def test_the_budget_goes_to_the_layers_that_lose_most():
    table = _table({"a": _uniform(800, (1.0, 0.1, 0.001)),
                    "b": _uniform(800, (0.02, 0.01, 0.0)),
                    "c": _uniform(800, (0.5, 0.2, 0.1))})
    low = allocate_bits(table, 2.0)
    assert {n: str(s) for n, s in low.choice.items()} == dict.fromkeys("abc", "uint2-g64-asym")
    plan = allocate_bits(table, 10 / 3)  # two upgrades of 2 -> 4 bits fit, not three
    assert plan.counts() == {"uint2-g64-asym": 1, "uint4-g128-asym": 2}
    assert str(plan.choice["b"]) == "uint2-g64-asym"
    assert plan.bits_per_weight <= 10 / 3 and plan.predicted_damage == pytest.approx(0.32)
    top = allocate_bits(table, 8.0)
    assert set(map(str, top.choice.values())) == {"int8-ch-sym"}


def test_a_candidate_with_more_bytes_and_no_less_damage_is_never_chosen():
    table = _table({"a": (800, {"w2g64": (200, 0.5), "w4g128": (400, 0.6),
                                "w8": (800, 0.1)})})
    assert str(allocate_bits(table, 4.0).choice["a"]) == "uint2-g64-asym"
    assert str(allocate_bits(table, 8.0).choice["a"]) == "int8-ch-sym"


def test_a_large_layers_upgrade_is_not_skipped_for_a_small_ones():
    table = _table({"A": (4096, {"w2g64": (1280, 1.0), "w4g128": (2112, 0.0), "w8": (4500, 0.0)}),
                    "B": (128, {"w2g64": (40, 0.1), "w4g128": (66, 0.0), "w8": (140, 0.0)})})
    plan = allocate_bits(table, 2152 * 8 / 4224)
    assert {n: str(s) for n, s in plan.choice.items()} == {"A": "uint4-g128-asym",
                                                           "B": "uint2-g64-asym"}
    assert plan.predicted_damage == pytest.approx(0.1)


def test_the_allocation_is_the_exact_optimum_on_small_instances():
    import itertools
    import random

    rng = random.Random(0)
    for trial in range(200):
        rows = {}
        for i in range(rng.randint(1, 5)):
            n = rng.choice([64, 128, 512, 1024])
            sizes = sorted(rng.sample(range(n // 8, n * 2), 3))
            harms = sorted((rng.random() for _ in range(3)), reverse=rng.random() < 0.8)
            rows[f"l{i}"] = (n, dict(zip(CANDIDATES, zip(sizes, harms, strict=True),
                                         strict=True)))
        table = _table(rows)
        low, high = table.bits_range()
        bits = rng.uniform(low, high)
        plan = allocate_bits(table, bits)
        budget = bits * sum(la.n_weights for la in table.layers) / 8
        keys = [str(c) for c in table.candidates]
        best = min(sum(la.damage[k] for la, k in zip(table.layers, pick, strict=True))
                   for pick in itertools.product(keys, repeat=len(table.layers))
                   if sum(la.nbytes[k] for la, k in zip(table.layers, pick, strict=True))
                   <= budget)
        used = sum(la.nbytes[str(plan.choice[la.name])] for la in table.layers)
        assert used <= budget and plan.predicted_damage == pytest.approx(best), trial


def test_bits_below_the_smallest_candidate_or_not_a_number_are_refused():
    table = _table({"a": _uniform(800, (1.0, 0.1, 0.0))})
    with pytest.raises(ValueError, match=r"bits=1\.5 is below 2\.000.*allowed: 2\.000 or more"):
        allocate_bits(table, 1.5)
    with pytest.raises(ValueError, match=r"bits='4'; allowed: a number"):
        allocate_bits(table, "4")


def test_damage_falls_with_bits_and_the_model_is_left_as_it_was():
    model = _tiny_llama()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    params = {n: id(p) for n, p in model.named_parameters()}
    sens = measure_sensitivity(model, CANDIDATES, _ids(), exclude=["lm_head", "*embed*"])
    assert sens.metric == "kl" and sens.n_positions == 4 * 24 and len(sens.layers) == 14
    for layer in sens.layers:
        d = [layer.damage[str(as_spec(c))] for c in CANDIDATES]
        assert d[0] > d[1] > d[2] >= 0, layer
    assert {n: id(p) for n, p in model.named_parameters()} == params
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n


def test_replaying_the_earlier_blocks_measures_what_full_forwards_measure(monkeypatch):
    model = _tiny_llama(layers=3)
    kwargs = {"include": ["*.layers.2.*", "*.layers.0.mlp.*"]}  # 7 + 3 layers
    calls = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    replayed = measure_sensitivity(model, ["w2g64", "w4g128"], _ids(), **kwargs)
    assert len(calls) == 1 + 3 * 2  # the float pass, then only for its own layers
    monkeypatch.setattr(sens_mod._BlockReplay, "block_of", lambda self, name: None)
    calls.clear()
    full = measure_sensitivity(model, ["w2g64", "w4g128"], _ids(), **kwargs)
    assert len(calls) == 1 + 10 * 2
    for a, b in zip(replayed.layers, full.layers, strict=True):
        for key in a.damage:
            assert a.damage[key] == pytest.approx(b.damage[key], rel=1e-4, abs=1e-9)


def test_shared_blocks_that_run_twice_are_measured_with_full_forwards():
    torch.manual_seed(0)
    config = transformers.AlbertConfig(
        vocab_size=96, embedding_size=64, hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_hidden_groups=2, num_attention_heads=4,
        max_position_embeddings=64)
    model = transformers.AlbertModel(config).eval()
    include = ["*albert_layer_groups.1.*ffn*"]
    sens = measure_sensitivity(model, ["w2g64", "w8"], [_ids(2, 16), _ids(3, 9)],
                               include=include)
    twin = copy.deepcopy(model)
    layer = twin.get_submodule(sens.layers[0].name)
    with torch.no_grad():
        layer.weight.copy_(lowbit.fake_quantize(layer.weight, as_spec("w2g64")))
        total, positions = 0.0, 0
        for ids in (_ids(2, 16), _ids(3, 9)):
            y, yq = model(ids).last_hidden_state.double(), twin(ids).last_hidden_state.double()
            total += float(((yq - y) ** 2).sum() / (y**2).sum()) * ids.numel()
            positions += ids.numel()
    assert sens.layers[0].damage["uint2-g64-asym"] == pytest.approx(total / positions, rel=1e-3)


def test_a_forward_wrapper_and_submodule_modes_are_left_as_they_were():
    model = _tiny_llama()
    block = model.model.layers[0]
    original, calls = block.forward, []

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    block.forward = wrapped
    model.train()
    model.model.embed_tokens.eval()
    measure_sensitivity(model, ["w2g64", "w8"], _ids(), include="model.layers.1.mlp.down_proj")
    assert block.__dict__["forward"] is wrapped
    assert model.training and not model.model.embed_tokens.training
    calls.clear()
    model(_ids())
    assert calls == [1]


def test_the_plan_quantizes_to_its_bits_and_layers_outside_it_stay_float():
    model = _tiny_llama()
    plan = mixed_precision(model, CANDIDATES, 4.0, _ids(), exclude=["lm_head", "*embed*"])
    assert 3.5 < plan.bits_per_weight <= 4.0
    assert sum(plan.counts().values()) == 14 and len(plan.counts()) >= 2
    lowbit.quantize(model, plan.specs)
    summary = model.lowbit_summary
    got = {m.name: m.spec for m in summary.quantized}
    assert got == {name: str(spec) for name, spec in plan.choice.items()}
    numel = sum(model.get_submodule(m.name).qweight.numel for m in summary.quantized)
    stored = sum(m.bytes_after for m in summary.quantized)
    assert stored * 8 / numel == pytest.approx(plan.bits_per_weight)
    assert isinstance(model.lm_head, nn.Linear)
    assert "| `model.layers.*.mlp.down_proj` | 2 |" in plan.table()


def test_models_without_logits_are_measured_by_relative_output_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    reference = copy.deepcopy(model)
    sens = measure_sensitivity(model, ["w2g64", "w8"], torch.randn(16, 64))
    assert sens.metric == "rel_mse" and [la.name for la in sens.layers] == ["0", "2"]
    x = torch.randn(16, 64)
    with torch.no_grad():
        q = copy.deepcopy(reference)
        q[0].weight.copy_(lowbit.fake_quantize(q[0].weight, as_spec("w2g64")))
        y, yq = reference(x), q(x)
    expected = float(((yq - y) ** 2).sum() / (y**2).sum())
    assert sens.layers[0].damage["uint2-g64-asym"] == pytest.approx(expected, rel=0.5)


@pytest.mark.parametrize(("candidates", "match"), [
    (["w4g128"], "two or more different specs"),
    (["w4g128", "w4g128"], "two or more different specs"),
    ("w4g128", "must be a list"),
    (["w4g128", "w8a8"], "quantizes activations"),
])
def test_bad_candidates_are_refused(candidates, match):
    with pytest.raises((ValueError, TypeError), match=match):
        measure_sensitivity(_tiny_llama(1), candidates, _ids())


def test_a_layer_a_candidate_cannot_take_is_named():
    model = nn.Sequential(nn.Linear(100, 8))
    with pytest.raises(ValueError, match=r"layer '0' \(Linear\), candidate uint4-g128-asym"):
        measure_sensitivity(model, ["w4g128", "w8"], torch.randn(4, 100))


def test_the_digest_tells_calibration_batches_apart():
    from lowbit.calib.sensitivity import batches_digest

    ids = _ids()
    assert batches_digest([ids]) == batches_digest([ids.clone()])
    assert batches_digest([ids]) != batches_digest([ids[:, :-1]])
    assert batches_digest([ids]) != batches_digest(list(ids.split(2)))
    floats = torch.randn(4, 8, dtype=torch.bfloat16)
    assert batches_digest([floats]) != batches_digest([floats.float()])


def test_infinite_damage_is_avoided_nan_is_refused_and_the_top_budget_is_reached():
    inf = float("inf")
    table = _table({"a": _uniform(800, (inf, inf, 0.1)), "b": _uniform(800, (0.5, 0.2, 0.0))})
    plan = allocate_bits(table, 5.0)
    assert str(plan.choice["a"]) == "int8-ch-sym" and plan.bits_per_weight <= 5.0
    table.layers[1].damage["uint2-g64-asym"] = float("nan")
    with pytest.raises(ValueError, match="layer 'b', candidate uint2-g64-asym: damage is NaN"):
        allocate_bits(table, 5.0)
    sizes = [45088768, 131072000, 45088768, 45088768, 131072000, 131072000, 131072000, 16777216]
    specs = [as_spec("w4g128"), as_spec("w8")]
    keys = [str(s) for s in specs]
    big = Sensitivity(specs, [LayerSensitivity(f"l{i}", "Linear", n,
                                               {keys[0]: n * 17 // 32, keys[1]: n + n // 512},
                                               {keys[0]: 1.0, keys[1]: 0.0})
                              for i, n in enumerate(sizes)], "kl", 1, 1)
    top = allocate_bits(big, big.bits_range()[1])
    assert {str(s) for s in top.choice.values()} == {"int8-ch-sym"}
    # 23B weights: bits_range()[1] * n / 8 comes out 4e-6 bytes short of the byte total
    huge = Sensitivity(specs, [LayerSensitivity(f"h{i}", "Linear", n,
                                                {keys[0]: n // 2, keys[1]: n + n // 32},
                                                {keys[0]: 1.0, keys[1]: 0.0})
                               for i, n in enumerate([9833815619, 3543818037, 1463349907,
                                                      195872739, 8179837913])], "kl", 1, 1)
    top = allocate_bits(huge, huge.bits_range()[1])
    assert {str(s) for s in top.choice.values()} == {"int8-ch-sym"}
    broken = _table({"a": _uniform(800, (inf, inf, inf))})
    assert allocate_bits(broken, 2.0).predicted_damage == inf  # not the clamp value


def test_positions_the_float_model_gives_no_mass_add_nothing():
    from lowbit.calib.sensitivity import _damage

    logits = torch.randn(2, 5, 16)
    logits[..., 3] = float("-inf")  # a masked vocabulary entry
    logp = torch.log_softmax(logits, -1)
    assert _damage("kl", (logp, logp.exp()), logits) == pytest.approx(0.0, abs=1e-6)
    other = logits.clone()
    other[..., 0] += 1.0
    assert 0 < _damage("kl", (logp, logp.exp()), other) < float("inf")
