"""The fused decode-step CPU ops against the torch formulas they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import cpu_decode


@pytest.fixture(scope="module", autouse=True)
def _built():
    if not cpu_decode.available(torch.zeros(1)):
        pytest.skip("cpu_decode ops could not be built here")


def test_rms_norm_matches_the_hf_formula_on_strided_input():
    torch.manual_seed(0)
    h = torch.randn(3, 5, 96) * 4
    w = torch.randn(96)
    last = h[:, -1]  # not contiguous
    ref = last * torch.rsqrt(last.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    assert torch.allclose(cpu_decode.rms_norm(last, w, 1e-5), ref, atol=1e-5, rtol=1e-5)


def _rotate_half(t):
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), -1)


@pytest.mark.parametrize("batch,length,start", [(1, 1, 7), (2, 3, 0), (2, 1, 11)])
def test_rope_kv_writes_the_cache_and_embeds_q(batch, length, start):
    torch.manual_seed(1)
    nh, nkv, hd, cache_len = 6, 2, 16, 16
    q = torch.randn(batch, length, nh * hd)
    k, v = torch.randn(batch, length, nkv * hd), torch.randn(batch, length, nkv * hd)
    angles = torch.rand(length, hd // 2) * 6
    cos = torch.cat([angles.cos()] * 2, -1)
    sin = torch.cat([angles.sin()] * 2, -1)
    signed = torch.cat((-sin[:, : hd // 2], sin[:, hd // 2:]), -1)
    kc, vc = torch.zeros(batch, nkv, cache_len, hd), torch.zeros(batch, nkv, cache_len, hd)

    def heads(t, n):
        return t.view(batch, length, n, hd).transpose(1, 2)

    q_ref = heads(q, nh) * cos + _rotate_half(heads(q, nh)) * sin
    k_ref = heads(k, nkv) * cos + _rotate_half(heads(k, nkv)) * sin
    cpu_decode.rope_kv(q, k, v, cos, signed, kc, vc, start, nh, nkv)
    assert torch.allclose(heads(q, nh), q_ref, atol=1e-6)
    assert torch.allclose(kc[:, :, start:start + length], k_ref, atol=1e-6)
    assert torch.equal(vc[:, :, start:start + length], heads(v, nkv))
    others = torch.ones(cache_len, dtype=torch.bool)
    others[start:start + length] = False
    assert not kc[:, :, others].any() and not vc[:, :, others].any()


@pytest.mark.parametrize("nh,nkv,length", [(6, 2, 1), (4, 4, 37), (8, 1, 200)])
def test_decode_attention_matches_sdpa(nh, nkv, length):
    torch.manual_seed(2)
    batch, hd, cache_len = 2, 32, 256
    q = torch.randn(batch, 1, nh * hd) * 3
    kc, vc = torch.randn(batch, nkv, cache_len, hd), torch.randn(batch, nkv, cache_len, hd)
    scale = hd**-0.5
    ref = F.scaled_dot_product_attention(
        q.view(batch, 1, nh, hd).transpose(1, 2), kc[:, :, :length], vc[:, :, :length],
        scale=scale, enable_gqa=True,
    ).transpose(1, 2).reshape(batch, 1, nh * hd)
    out = cpu_decode.decode_attention(q, kc, vc, length, scale, torch.empty(cache_len))
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_shapes_that_do_not_fit_are_refused_before_the_c_code():
    kc = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="decode_attention: q"):
        cpu_decode.decode_attention(torch.randn(1, 1, 8), kc, kc, 2, 0.3, torch.empty(4))
    q, k = torch.randn(1, 1, 32), torch.randn(1, 1, 32)
    table = torch.zeros(1, 8)
    with pytest.raises(ValueError, match="rope_kv: q"):
        cpu_decode.rope_kv(q, k, k, table, table, torch.zeros(1, 1, 4, 8), torch.zeros(1), 0,
                           4, 4)
    with pytest.raises(ValueError, match="weight has 3 elements"):
        cpu_decode.rms_norm(torch.randn(2, 8), torch.randn(3), 1e-5)


def test_bound_ops_equal_the_one_shot_ops():
    """The Decoder's bound forms (weights, caches and tables checked once) compute what the
    one-shot ops compute, bit for bit; the residual add fused into the norm is h += delta."""
    torch.manual_seed(3)
    batch, nh, nkv, hd, cache_len, start = 2, 6, 2, 16, 12, 5
    w = torch.randn(nh * hd)
    h, delta = torch.randn(batch, 1, nh * hd), torch.randn(batch, 1, nh * hd)
    norm = cpu_decode.bind_rms_norm(w, 1e-5)
    assert torch.equal(norm(h), cpu_decode.rms_norm(h, w, 1e-5))
    expected = cpu_decode.rms_norm(h + delta, w, 1e-5)
    total = h + delta
    assert torch.equal(norm.add(h, delta), expected) and torch.equal(h, total)

    angles = torch.rand(cache_len, hd // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    q, k, v = (torch.randn(batch, 1, n * hd) for n in (nh, nkv, nkv))
    caches = [torch.zeros(batch, nkv, cache_len, hd) for _ in range(4)]
    q1 = q.clone()
    cpu_decode.rope_kv(q, k, v, cos[start:start + 1], sin[start:start + 1], caches[0],
                       caches[1], start, nh, nkv)
    cpu_decode.bind_rope_kv(cos, sin, caches[2], caches[3], nh, nkv)(q1, k, v, start)
    assert torch.equal(q1, q) and torch.equal(caches[2], caches[0])
    assert torch.equal(caches[3], caches[1])

    scratch = torch.empty(cache_len)
    attend = cpu_decode.bind_decode_attention(caches[0], caches[1], 0.25, scratch)
    assert torch.equal(attend(q, start + 1),
                       cpu_decode.decode_attention(q, caches[0], caches[1], start + 1, 0.25,
                                                   scratch))


def test_bound_ops_on_left_padded_rows_shift_positions_and_hide_the_padding():
    """With per-row left padding, token t of row b in slot start + t takes the rotary row of
    position start + t - pad[b] (at least 0), and attention never reads slots below pad[b]: the
    same as the one-shot ops on each row alone, from its first real slot."""
    torch.manual_seed(4)
    batch, nh, nkv, hd, cache_len, start = 3, 4, 2, 16, 12, 6
    pad = torch.tensor([0, 2, 5])
    angles = torch.rand(cache_len, hd // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    q, k, v = (torch.randn(batch, 2, n * hd) for n in (nh, nkv, nkv))
    kc, vc = torch.randn(batch, nkv, cache_len, hd), torch.randn(batch, nkv, cache_len, hd)
    qb = q.clone()
    cpu_decode.bind_rope_kv(cos, sin, kc, vc, nh, nkv)(qb, k, v, start, pad)
    scratch = torch.empty(cache_len)
    out = cpu_decode.bind_decode_attention(kc, vc, 0.25, scratch)(qb[:, -1:].contiguous(),
                                                                  start + 2, pad)
    for b in range(batch):
        first = int(pad[b])
        row_kc, row_vc = torch.zeros(1, nkv, cache_len, hd), torch.zeros(1, nkv, cache_len, hd)
        qa = q[b:b + 1].clone()
        position = start - first
        cpu_decode.rope_kv(qa, k[b:b + 1].clone(), v[b:b + 1].clone(),
                           cos[position:position + 2], sin[position:position + 2], row_kc,
                           row_vc, start, nh, nkv)
        assert torch.equal(qa, qb[b:b + 1])
        assert torch.equal(kc[b, :, start:start + 2], row_kc[0, :, start:start + 2])
        alone = cpu_decode.decode_attention(qa[:, -1:].contiguous(),
                                            kc[b:b + 1, :, first:].contiguous(),
                                            vc[b:b + 1, :, first:].contiguous(),
                                            start + 2 - first, 0.25, scratch)
        assert torch.allclose(out[b:b + 1], alone, atol=1e-6, rtol=1e-6)
    # a negative count reads as none; a row of padding only sees its own last slot
    attend, q_last, last = cpu_decode.bind_decode_attention(kc, vc, 0.25, scratch), \
        qb[:, -1:].contiguous(), start + 2
    assert torch.equal(attend(q_last, last, torch.tensor([-4, 0, 0])), attend(q_last, last))
    own = attend(q_last, last, torch.tensor([0, 0, last + 3]))[2]  # [1, nh * hd]
    values = vc[2, :, last - 1].repeat_interleave(nh // nkv, 0).reshape(1, -1)
    assert torch.allclose(own, values, atol=1e-6)
    with pytest.raises(ValueError, match="pad: expected contiguous int64"):
        cpu_decode.bind_decode_attention(kc, vc, 0.25, scratch)(qb[:, -1:].contiguous(), 4,
                                                                pad.int())


def test_bound_ops_refuse_inputs_that_do_not_fit():
    kc = torch.zeros(1, 2, 4, 8)
    table = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="bind_rope_kv"):
        cpu_decode.bind_rope_kv(table, table, kc, kc, 3, 2)  # 3 heads over 2 kv heads
    rope = cpu_decode.bind_rope_kv(table, table, kc, kc, 4, 2)
    with pytest.raises(ValueError, match="rope_kv: q"):
        rope(torch.randn(1, 1, 32), torch.randn(1, 1, 16), torch.randn(1, 1, 16), 4)  # past L
    with pytest.raises(ValueError, match="rope_kv: k"):
        rope(torch.randn(1, 1, 32), torch.randn(1, 1, 8), torch.randn(1, 1, 16), 0)
    attend = cpu_decode.bind_decode_attention(kc, kc, 0.3, torch.empty(4))
    with pytest.raises(ValueError, match="decode_attention: q"):
        attend(torch.randn(1, 1, 32), 5)
    norm = cpu_decode.bind_rms_norm(torch.randn(8), 1e-5)
    with pytest.raises(ValueError, match="rms_norm: x"):
        norm(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="add_rms_norm: delta"):
        norm.add(torch.randn(2, 8), torch.randn(2, 4))


def test_bound_norm_follows_a_weight_whose_storage_moved():
    """A model's parameters can move after binding (``share_memory()``, ``.data`` swaps): the
    bound norm reads the weight's address per call."""
    w = torch.nn.Parameter(torch.randn(16))
    norm = cpu_decode.bind_rms_norm(w, 1e-5)
    x = torch.randn(2, 16)
    w.data = torch.randn(16) * 3
    assert torch.equal(norm(x), cpu_decode.rms_norm(x, w.detach(), 1e-5))


def test_step_forms_equal_the_bound_ops_and_refuse_buffers_that_do_not_fit():
    """The Decoder's step forms (buffers checked once, then calls with integers only) compute
    what the bound ops compute, bit for bit, left padding included; slots and lengths outside
    the caches are refused."""
    torch.manual_seed(5)
    batch, nh, nkv, hd, cache_len, start = 2, 4, 2, 16, 10, 6
    pad = torch.tensor([0, 3])
    w = torch.randn(nh * hd)
    norm = cpu_decode.bind_rms_norm(w, 1e-5)
    h, delta, out = torch.randn(batch, 1, nh * hd), torch.randn(batch, 1, nh * hd), \
        torch.empty(batch, 1, nh * hd)
    h2 = h.clone()
    norm.step(h, out)()
    assert torch.equal(out, norm(h))
    norm.step(h, out, delta)()
    assert torch.equal(out, norm.add(h2, delta)) and torch.equal(h, h2)

    angles = torch.rand(cache_len, hd // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    q, k, v = (torch.randn(batch, 1, n * hd) for n in (nh, nkv, nkv))
    caches = [torch.randn(batch, nkv, cache_len, hd) for _ in range(2)]
    caches += [c.clone() for c in caches]
    q2 = q.clone()
    cpu_decode.bind_rope_kv(cos, sin, caches[0], caches[1], nh, nkv)(q, k, v, start, pad)
    rope = cpu_decode.bind_rope_kv(cos, sin, caches[2], caches[3], nh, nkv)
    rope.step(q2, k, v)(start, pad.data_ptr())
    assert torch.equal(q2, q) and torch.equal(caches[2], caches[0])
    assert torch.equal(caches[3], caches[1])
    with pytest.raises(ValueError, match="outside the caches"):
        rope.step(q2, k, v)(cache_len, None)
    with pytest.raises(ValueError, match="rope_kv step: k"):
        rope.step(q2, torch.randn(batch, 1, nh * hd), v)

    scratch = torch.empty(cache_len)
    attend = cpu_decode.bind_decode_attention(caches[0], caches[1], 0.25, scratch)
    attended = torch.empty_like(q)
    attend.step(q, attended, nh)(start + 1, pad.data_ptr())
    assert torch.equal(attended, attend(q, start + 1, pad))
    with pytest.raises(ValueError, match=r"length 11 outside \(0, 10\]"):
        attend.step(q, attended, nh)(cache_len + 1, None)
    with pytest.raises(ValueError, match="decode_attention step: out"):
        attend.step(q, torch.empty(batch, 1, nkv * hd), nh)
