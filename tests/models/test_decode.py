"""lowbit's Decoder against transformers: same logits and greedy tokens on the fixture Llama (float
and quantized) and on tiny random mistral / qwen2 models; sampling, eos and bad input."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lowbit  # noqa: E402
from lowbit.kernels import cpu_decode  # noqa: E402
from lowbit.models.decode import STEP_LINEARS, Decoder, generate  # noqa: E402

LLAMA_3M = Path(__file__).resolve().parents[3] / "shared" / "models" / "llama-3m-shakespeare-mix"


@pytest.fixture(scope="module")
def llama():
    if not (LLAMA_3M / "config.json").exists():
        pytest.skip(f"fixture model {LLAMA_3M} is absent")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(LLAMA_3M, dtype=torch.float32).eval()


def prompt(batch: int = 1, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 2000, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_generate(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=1)


def check_logits_match_hf(model, ids: torch.Tensor, split: int, atol: float,
                          fused: bool | None = None) -> None:
    """Prefill ``ids[:, :split]``, then one token at a time; every step's last-position logits
    against transformers' full forward of the same prefix."""
    decoder = Decoder(model, ids.shape[0], ids.shape[1] + 1, fused=fused)
    with torch.inference_mode():
        steps = [(0, decoder.forward(ids[:, :split], 0))]
        steps += [(t, decoder.forward(ids[:, t:t + 1], t)) for t in range(split, ids.shape[1])]
        for t, logits in steps:
            end = split if t == 0 else t + 1
            ref = model(ids[:, :end]).logits[:, -1]
            assert torch.allclose(logits, ref, atol=atol, rtol=0), (t, (logits - ref).abs().max())


FUSED = [pytest.param(False, id="torch-ops"), pytest.param(True, id="fused-cpu-ops")]


@pytest.fixture(params=FUSED)
def fused(request) -> bool:
    if request.param and not cpu_decode.available(torch.zeros(1)):
        pytest.skip("cpu_decode ops could not be built here")
    return request.param


def test_fixture_llama_logits_and_greedy_tokens_match_transformers(llama, fused):
    ids = prompt(batch=2)
    check_logits_match_hf(llama, torch.cat([ids, prompt(2, 6, seed=1)], 1), split=12, atol=1e-4,
                          fused=fused)
    decoder = Decoder(llama, 2, 32, fused=fused)
    assert torch.equal(decoder.generate(ids, 20), hf_generate(llama, ids, 20))


def test_quantized_model_uses_its_kernels_and_matches_its_hf_forward(llama):
    model = lowbit.quantize(copy.deepcopy(llama), "w4g128")
    ids = torch.cat([prompt(), prompt(1, 5, seed=2)], 1)
    check_logits_match_hf(model, ids, split=12, atol=1e-3)
    assert torch.equal(generate(model, ids[:, :12], 10), hf_generate(model, ids[:, :12], 10))


def test_a_chunk_after_cached_tokens_is_causal(llama, fused):
    """A multi-token forward after a prefill (explicit mask) equals one whole prefill."""
    ids = prompt(length=16)
    decoder = Decoder(llama, 1, 16, fused=fused)
    with torch.inference_mode():
        whole = decoder.forward(ids, 0)
        decoder.forward(ids[:, :9], 0)
        chunked = decoder.forward(ids[:, 9:], 9)
    assert torch.allclose(whole, chunked, atol=1e-5, rtol=0)


def _tiny(model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type,extra", [
    ("mistral", {"sliding_window": 64}),  # a window no shorter than max_len changes nothing
    ("qwen2", {}),  # q/k/v carry biases
    ("llama", {"attention_bias": True, "tie_word_embeddings": True}),
    ("qwen3", {"head_dim": 16}),  # RMSNorm of q and k per head, before the rotary embedding
])
def test_tiny_random_models_of_each_supported_type(model_type, extra, fused):
    model = _tiny(model_type, **extra)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(3))
    check_logits_match_hf(model, ids, split=6, atol=1e-5, fused=fused)


@pytest.mark.parametrize("model_type,extra", [
    ("mixtral", {"num_local_experts": 4}),
    # layer 0 dense (wider than the experts), layer 1 routed experts plus a gated shared one
    ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 64, "mlp_only_layers": [0]}),
    ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "head_dim": 16, "mlp_only_layers": [1]}),
])
@pytest.mark.parametrize("scheme", [None, "w8"])
def test_mixture_of_experts_layers_run_their_blocks(model_type, extra, scheme, fused):
    import lowbit

    model = _tiny(model_type, **extra)
    with torch.no_grad():  # routing that differs by token (random init routes uniformly)
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.set_experts_implementation("eager")
    if scheme is not None:
        lowbit.quantize(model, scheme)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(3))
    check_logits_match_hf(model, ids, split=6, atol=1e-5, fused=fused)
    decoder = Decoder(model, 1, 18, fused=fused)
    assert torch.equal(decoder.generate(ids[:1], 8), hf_generate(model, ids[:1], 8))


@pytest.mark.parametrize("window_layers,refused", [(2, False), (1, True)])
def test_a_qwen_window_counts_only_where_a_layer_slides(window_layers, refused):
    """use_sliding_window with max_window_layers = the layer count: no layer slides."""
    model = _tiny("qwen3", head_dim=16, use_sliding_window=True, sliding_window=4,
                  max_window_layers=window_layers)
    if refused:
        with pytest.raises(ValueError, match="exceeds the model's sliding_window=4"):
            Decoder(model, 1, 16)
        return
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(5))
    assert torch.equal(Decoder(model, 1, 16).generate(ids, 8), hf_generate(model, ids, 8))


def test_a_mixtral_sliding_window_shorter_than_max_len_is_refused():
    model = _tiny("mixtral", num_local_experts=4, sliding_window=8)
    with pytest.raises(ValueError, match="exceeds the model's sliding_window=8"):
        Decoder(model, 1, 16)


def test_bfloat16_model_follows_transformers_numerics():
    """Half-precision weights: RMSNorm statistics in float32 as transformers computes them."""
    model = _tiny("llama").to(torch.bfloat16)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(4))
    decoder = Decoder(model, 2, 10)
    assert not decoder.fused
    with torch.inference_mode():
        ours = decoder.forward(ids, 0).float()
        ref = model(ids).logits[:, -1].float()
    assert (ours - ref).abs().max() <= 0.05 * ref.abs().max()


def test_sampling_is_reproducible_and_top_k_1_is_greedy(llama):
    ids = prompt()
    decoder = Decoder(llama, 1, 40)

    def sample(seed, **kw):
        return decoder.generate(ids, 16, do_sample=True,
                                generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(5, temperature=0.8), sample(5, temperature=0.8))
    assert torch.equal(sample(5, top_k=1), decoder.generate(ids, 16))


def test_rows_stop_at_eos_and_pad_after(llama):
    ids = prompt(batch=2)
    free = generate(llama, ids, 12)
    eos = int(free[0, 14])  # row 0's third new token
    pad = 1 if eos != 1 else 2
    out = generate(llama, ids, 12, eos_token_id=eos, pad_token_id=pad)
    row0 = out[0, 12:].tolist()
    first = row0.index(eos)
    assert first <= 2 and all(t == pad for t in row0[first + 1:])
    assert out.shape[1] <= free.shape[1]
    with pytest.raises(ValueError, match="pad_token_id=-1"):
        generate(llama, ids, 12, eos_token_id=eos, pad_token_id=-1)


def _left_padded(rows: list[torch.Tensor], pad_id: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


def test_left_padded_prompts_decode_like_each_prompt_alone(llama, fused):
    rows = [prompt(length=12, seed=1)[0], prompt(length=7, seed=2)[0], prompt(length=1, seed=3)[0]]
    ids, mask = _left_padded(rows)
    decoder = Decoder(llama, len(rows), ids.shape[1] + 10, fused=fused)
    with torch.inference_mode():
        pad = (mask == 0).sum(1)
        logits = decoder.forward(ids, 0, pad)
        out = decoder.generate(ids, 10, attention_mask=mask)
        for i, row in enumerate(rows):
            alone = Decoder(llama, 1, len(row) + 10, fused=fused)
            assert torch.allclose(logits[i], alone.forward(row[None], 0)[0], atol=1e-4, rtol=0)
            assert torch.equal(out[i, ids.shape[1]:], alone.generate(row[None], 10)[0, len(row):])
    # transformers' generate on the same left-padded batch picks the same tokens
    with torch.inference_mode():
        ref = llama.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10,
                             do_sample=False, pad_token_id=1)
    assert torch.equal(out, ref)


def test_padding_token_ids_outside_the_vocabulary_are_never_looked_up(llama):
    ids, mask = _left_padded([prompt(length=6, seed=4)[0], prompt(length=3, seed=5)[0]])
    expected = generate(llama, ids, 4, attention_mask=mask)
    ids[mask == 0] = llama.config.vocab_size + 7  # e.g. a pad token added to the tokenizer only
    got = generate(llama, ids, 4, attention_mask=mask)
    assert torch.equal(got[:, ids.shape[1]:], expected[:, ids.shape[1]:])
    assert torch.equal(got[:, :ids.shape[1]], ids)  # the prompt comes back as given


def test_an_all_ones_mask_is_the_unpadded_path(llama):
    ids = prompt(batch=2)
    assert torch.equal(generate(llama, ids, 6, attention_mask=torch.ones_like(ids)),
                       generate(llama, ids, 6))


def test_bad_attention_masks_fail_in_one_line(llama):
    ids = prompt(batch=2, length=4)
    cases = [
        (torch.ones(2, 3, dtype=torch.long), "must have input_ids' shape"),
        (torch.full_like(ids, 2), "0 \\(padding\\) and 1 \\(token\\) only"),
        (torch.tensor([[0, 0.5, 1, 1], [1, 1, 1, 1]]), "0 \\(padding\\) and 1 \\(token\\) only"),
        (torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), "pad prompts on the left"),
        (torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]), "a row of padding only"),
    ]
    for mask, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(llama, ids, 2, attention_mask=mask)


def test_bad_input_fails_in_one_line(llama):
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        Decoder(_tiny("gpt2", n_embd=32, n_layer=1, n_head=2), 1, 8)
    decoder = Decoder(llama, 1, 16)
    with pytest.raises(ValueError, match="input_ids must be int64"):
        decoder.generate(prompt().float(), 2)
    with pytest.raises(ValueError, match="batch 2; this Decoder was built for 1"):
        decoder.generate(prompt(batch=2), 2)
    with pytest.raises(ValueError, match="max_len=16"):
        decoder.generate(prompt(), 5)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        Decoder(llama, 1, 10**6)
    with pytest.raises(ValueError, match="fused=True needs float32 on CPU"):
        Decoder(copy.deepcopy(llama).to(torch.bfloat16), 1, 8, fused=True)
    with pytest.raises(ValueError, match="top_k=0; must be >= 1"):
        decoder.generate(prompt(), 2, do_sample=True, top_k=0)
    with pytest.raises(ValueError, match=r"ids \(1, 12\) at start=10: this Decoder holds"):
        decoder.forward(prompt(), 10)
    with pytest.raises(ValueError, match="exceeds the model's sliding_window=8"):
        Decoder(_tiny("mistral", sliding_window=8), 1, 16)
    with pytest.raises(ValueError, match="rope_type='dynamic' is not supported"):
        Decoder(_tiny("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}), 1, 16)


def _donor_weights(model, seed: int) -> None:
    """Fresh random weights in place, unlike the model _tiny drew (its seed is fixed)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_a_model_changed_after_binding_is_bound_again(fused):
    """Weights replaced, moved by a .data swap or to shared memory, or swapped for another module
    after the Decoder was built: the next generate binds them again and matches a freshly built
    Decoder."""
    model = lowbit.quantize(_tiny("llama"), "w8")
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(5))
    decoder = Decoder(model, 1, 16, fused=fused)
    first = decoder.generate(ids, 8)

    donor = _tiny("llama")
    _donor_weights(donor, 9)
    donor = lowbit.quantize(donor, "w8")
    layer, other = model.model.layers[0], donor.model.layers[0]
    layer.self_attn.q_proj.set_weight(other.self_attn.q_proj.qweight)
    layer.mlp.down_proj.set_weight(other.mlp.down_proj.qweight)
    model.model.layers[1].mlp.up_proj = donor.model.layers[1].mlp.up_proj
    changed = decoder.generate(ids, 8)
    assert torch.equal(changed, Decoder(model, 1, 16, fused=fused).generate(ids, 8))
    assert not torch.equal(changed, first)

    # the same tensor objects at new addresses: the old storage is freed
    v_proj = model.model.layers[1].self_attn.v_proj
    v_proj.weight_packed.data = other.self_attn.v_proj.weight_packed.clone()
    swapped = decoder.generate(ids, 8)
    assert torch.equal(swapped, Decoder(model, 1, 16, fused=fused).generate(ids, 8))
    model.share_memory()  # every tensor moves
    assert torch.equal(decoder.generate(ids, 8), swapped)

    before = decoder.blocks[0].q
    layer.self_attn.q_proj.kernel = "reference"  # a forced kernel: bound again
    decoder.generate(ids, 2)
    assert decoder.blocks[0].q is not before


def test_a_failed_rebinding_is_retried_and_caches_stay_usable(fused):
    model = lowbit.quantize(_tiny("llama"), "w8")
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(6))
    decoder = Decoder(model, 1, 16, fused=fused)
    expected = decoder.generate(ids, 4)
    mlp = model.model.layers[1].mlp
    up = mlp.up_proj
    mlp.up_proj = torch.nn.Identity()
    with pytest.raises(TypeError, match="expected nn.Linear or lowbit QuantLinear"):
        decoder.generate(ids, 4)
    with pytest.raises(ValueError, match="last binding failed"):  # nothing half-bound runs
        decoder.forward(ids[:, :1], 6)
    mlp.up_proj = up  # back as it was bound: the half-built Decoder binds again
    assert torch.equal(decoder.generate(ids, 4), expected)
    decoder.forward(ids, 0)  # outside inference_mode: the rebuilt caches are normal tensors


def test_a_quantized_model_cast_to_bfloat16_keeps_its_stored_weights():
    """A dtype cast moves the quantized state without rounding it (the spec fixes its dtypes)
    and makes bfloat16 the layers' compute dtype: the Decoder and transformers agree."""
    model = lowbit.quantize(_tiny("llama"), "w8")
    q = model.model.layers[0].self_attn.q_proj
    stored = {name: t.clone() for name, t in q.named_buffers() if name != "bias"}
    model.to(torch.bfloat16)
    assert q.weight_dtype == torch.bfloat16
    for name, t in q.named_buffers():
        if name in stored:
            assert t.dtype == stored[name].dtype and torch.equal(t, stored[name]), name
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(7))
    assert torch.equal(generate(model, ids, 6), hf_generate(model, ids, 6))


def test_padding_counts_in_any_integer_dtype_and_negative_ones_refused(llama, fused):
    ids, mask = _left_padded([prompt(length=6, seed=8)[0], prompt(length=3, seed=9)[0]])
    decoder = Decoder(llama, 2, 12, fused=fused)
    pad = (mask == 0).sum(1)
    with torch.inference_mode():
        expected = decoder.forward(ids, 0, pad)
        assert torch.equal(decoder.forward(ids, 0, pad.int()), expected)
        for bad in (torch.tensor([0, -1]), torch.tensor([0.0, 3.5]), torch.tensor([0, 1]) > 0):
            with pytest.raises(ValueError, match="pad must hold 2 integer padding counts >= 0"):
                decoder.forward(ids, 0, bad)


@pytest.mark.parametrize("scheme", ["w8", "w8a8"])
def test_fused_steps_call_the_raw_kernel_entries_and_see_in_place_edits(monkeypatch, scheme):
    """A fused step's Linears write into the Decoder's buffers through the kernels' raw entries:
    the same tokens as the checked calls; weights edited in place between generates are
    seen."""
    if not cpu_decode.available(torch.zeros(1)):
        pytest.skip("cpu_decode ops could not be built here")
    model = lowbit.quantize(_tiny("llama"), scheme)
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(7))
    decoder = Decoder(model, 2, 20, fused=True)
    for layer in decoder._program:
        assert all(getattr(layer, name).__name__ == "native" for name in STEP_LINEARS)
    first = decoder.generate(ids, 12)
    monkeypatch.setattr("lowbit.models.decode._step_linear",
                        lambda module, linear, x, out: lambda: out.copy_(linear(x)))
    checked = Decoder(model, 2, 20, fused=True)
    assert torch.equal(first, checked.generate(ids, 12))
    assert checked._program[0][0].__name__ == "<lambda>"  # the checked calls ran
    monkeypatch.undo()

    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight_scale.mul_(-3)
        model.model.layers[0].self_attn.q_proj.weight_scale.mul_(5)
        codes = model.model.layers[1].mlp.down_proj.weight_packed
        codes.copy_(codes.flip(0))  # (w8a8 repacks them)
    edited = decoder.generate(ids, 12)
    assert torch.equal(edited, Decoder(model, 2, 20, fused=True).generate(ids, 12))
    assert not torch.equal(edited, first)


def test_a_forward_loop_of_ones_own_follows_refresh(fused):
    """Decoder.forward after in-place weight edits and a .data swap, then refresh(): the same
    logits as a freshly built Decoder (the step entries resolved again, the model bound
    again)."""
    model = lowbit.quantize(_tiny("llama"), "w8a8")
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(8))
    decoder = Decoder(model, 1, 16, fused=fused)

    def steps(d: Decoder) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [d.forward(ids, 0)] + [d.forward(ids[:, t:t + 1], 6 + t) for t in range(3)]

    steps(decoder)
    codes = model.model.layers[0].mlp.down_proj.weight_packed
    with torch.no_grad():
        codes.copy_(codes.flip(0))
    decoder.refresh()
    for got, expected in zip(steps(decoder), steps(Decoder(model, 1, 16, fused=fused)),
                             strict=True):
        assert torch.equal(got, expected)
    up = model.model.layers[1].mlp.up_proj
    up.weight_packed.data = up.weight_packed.flip(1).clone()  # the old storage is freed
    decoder.refresh()
    for got, expected in zip(steps(decoder), steps(Decoder(model, 1, 16, fused=fused)),
                             strict=True):
        assert torch.equal(got, expected)


def test_one_token_forward_outside_inference_mode(fused):
    """A float model whose parameters require gradients, with gradients enabled, and a Decoder
    built under inference_mode then used outside it: one-token forwards run and match
    inference_mode's logits."""
    model = _tiny("llama")
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        built_inside = Decoder(model, 1, 16, fused=fused)
        expected = [built_inside.forward(ids, 0), built_inside.forward(ids[:, :1], 6)]
    for decoder, context in ((Decoder(model, 1, 16, fused=fused), torch.enable_grad),
                             (built_inside, torch.no_grad)):
        with context():
            got = [decoder.forward(ids, 0), decoder.forward(ids[:, :1], 6)]
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
