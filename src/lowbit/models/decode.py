"""A lean decode loop for Llama-family causal LMs (llama, mistral, qwen2, qwen3; mixtral,
qwen2_moe and qwen3_moe with their MoE blocks): static KV cache, every Linear bound to its
kernel once.

transformers' ``generate`` spends most of a small model's step in Python (cache objects, masks,
logits processors, one ``nn.Module.__call__`` per layer): on the 19M-parameter fixture LM on
this project's CPU that is about half of the step, which hides whatever the weight format saves.
:class:`Decoder` runs the same modules' weights with a few calls per layer:

- each Linear becomes a bound callable once (``F.linear`` on its weight for ``nn.Linear``; the
  kernel lowbit's dispatch picks, resolved for this input kind, for ``QuantLinear``), so fp32 and
  quantized models get the same treatment and compare fairly;
- on CPU float32 a one-token step is a program of twelve calls per layer over fixed buffers
  (:class:`StepLayer`): the Linears write into them (torch's GEMM with ``out=`` for float
  weights, lowbit's kernels through their raw C entries), RMSNorm with the residual add, rotary
  + cache write and attention are one C call each, SiLU x up two in-place torch ops;
- keys and values go into a preallocated cache ``[layers, batch, kv_heads, max_len, head_dim]``;
- rotary tables come from the model's own ``rotary_emb``, computed once for ``max_len``
  positions (so rope types whose tables depend on the sequence length, dynamic NTK and
  longrope, are refused).

It covers decoder-only models with pre-norm RMSNorm blocks, rotary attention (grouped-query
allowed; Qwen3's per-head RMSNorm of q and k) and a gated SiLU MLP or a mixture-of-experts
block (the layer's own module, router and experts, called on the step's buffer: its expert
Linears run their kernels through ``nn.Module.__call__``, not bound), in inference mode,
batches of prompts (of different lengths: left-padded with an attention mask), greedy or
sampled. Anything else raises a ValueError naming what is unsupported. Tested on CPU; on other
devices it runs the torch ops (not yet measured on a GPU).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels import cpu_decode, dispatch
from lowbit.kernels.dispatch import bound_linear

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe",
                         "qwen3_moe")

Linear = Callable[[torch.Tensor], torch.Tensor]


def bind_linear(module: nn.Module, example: torch.Tensor) -> Linear:
    """``x -> module(x)`` without ``nn.Module.__call__``; for a QuantLinear the kernel that
    dispatch picks for inputs like ``example``, resolved now."""
    from lowbit.nn.modules import QuantLinear

    if isinstance(module, QuantLinear):
        return bound_linear(example, module._weight_view(), module.bias, kernel=module.kernel,
                            cache=module._kernel_cache)
    if isinstance(module, nn.Linear):
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    raise TypeError(f"expected nn.Linear or lowbit QuantLinear, got {type(module).__name__}")


@dataclass
class _Block:
    attn_norm: torch.Tensor
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    mlp_norm: torch.Tensor
    gate: Linear | None  # None in a mixture-of-experts layer: moe runs instead
    up: Linear | None
    down: Linear | None
    moe: nn.Module | None = None  # the layer's MoE block (router + experts), called as is
    q_norm: torch.Tensor | None = None  # Qwen3: RMSNorm weights [head_dim] of q and k per head
    k_norm: torch.Tensor | None = None
    # the fused CPU ops bound to this layer's norms, cache and tables (None: torch ops)
    attn_norm_op: Callable | None = None
    mlp_norm_op: Callable | None = None
    rope: Callable | None = None
    attend: Callable | None = None
    q_norm_op: Callable | None = None
    k_norm_op: Callable | None = None
    modules: tuple[nn.Module, ...] = ()  # q_proj .. down_proj

    def linears(self) -> tuple[Linear, ...]:
        return self.q, self.k, self.v, self.o, self.gate, self.up, self.down

    def mlp(self, r: torch.Tensor) -> torch.Tensor:
        if self.moe is not None:
            out = self.moe(r)
            return out[0] if isinstance(out, tuple) else out
        return self.down(F.silu(self.gate(r)) * self.up(r))


class StepLayer(NamedTuple):
    """One layer of a fused one-token step (:meth:`Decoder._resolve_steps`): calls on the
    Decoder's step buffers, in this order."""

    q: Callable[[], None]
    k: Callable[[], None]
    v: Callable[[], None]
    rope: Callable[[int, int | None], None]  # (slot, pad pointer)
    attend: Callable[[int, int | None], None]  # (length, pad pointer)
    o: Callable[[], None]
    mlp_norm: Callable[[], None]  # h += o; r = norm(h)
    gate: Callable[[], None]
    up: Callable[[], None]
    act: Callable[[], None]  # g = silu(g) * u
    down: Callable[[], None]
    after: Callable[[], None]  # h += d; r = the next norm of h


STEP_LINEARS = ("q", "k", "v", "o", "gate", "up", "down")  # StepLayer's Linear calls


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return "default"
    return str(params.get("rope_type", params.get("type", "default")))


def _check_supported(model: nn.Module, max_len: int) -> None:
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={kind!r} is not supported by lowbit's decoder; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (use model.generate for others)"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config.hidden_act!r}; the decoder supports 'silu'")
    window = getattr(config, "sliding_window", None)
    # mistral and mixtral apply a set sliding_window; the qwen types where layer_types (from
    # use_sliding_window and max_window_layers) has a sliding layer
    layer_types = getattr(config, "layer_types", None)
    if kind in ("mistral", "mixtral"):
        uses_window = True
    elif layer_types is not None:
        uses_window = "sliding_attention" in layer_types
    else:
        uses_window = bool(getattr(config, "use_sliding_window", False))
    if uses_window and window is not None and window < max_len:
        raise ValueError(f"max_len={max_len} exceeds the model's sliding_window={window}; "
                         "sliding-window attention is not supported by lowbit's decoder")
    if _rope_type(config) in ("dynamic", "longrope"):  # their tables depend on the length
        raise ValueError(f"rope_type={_rope_type(config)!r} is not supported by lowbit's "
                         "decoder (its tables are computed once for max_len)")


class Decoder:
    """Greedy or sampled decoding of a Llama-family HF causal LM with a static KV cache.

    ``Decoder(model, batch, max_len)`` binds the model's layers for ``batch`` rows and at most
    ``max_len`` positions (prompt + new tokens); :meth:`generate` may then be called repeatedly.
    The model is not modified; its weights are shared, not copied, and bound at construction.
    In-place edits of them, and a changed torch thread count, are seen from the next
    :meth:`generate` (a loop of your own over :meth:`forward`: after :meth:`refresh`); a model
    whose tensors were replaced or moved since (``.to()``, ``share_memory()``, ``set_weight``,
    a swapped module) is bound again, caches included, at the next :meth:`generate`.
    """

    def __init__(
        self, model: nn.Module, batch: int, max_len: int, *, fused: bool | None = None
    ) -> None:
        with torch.inference_mode(False):  # its tensors usable in and outside inference_mode
            self._build(model, batch, max_len, fused)

    def _build(self, model: nn.Module, batch: int, max_len: int, fused: bool | None) -> None:
        # unbound until the end (a failure part way leaves it to be built again), and the old
        # caches dropped before the new ones are allocated
        self._bound_to = None
        self.k_cache = self.v_cache = self.k_layers = self.v_layers = None
        self._program = self._step_buffers = self._first_norm = self.final_norm_op = None
        _check_supported(model, max_len)
        if batch < 1 or max_len < 2:
            raise ValueError(f"batch={batch}, max_len={max_len}; need batch >= 1, max_len >= 2")
        self._fused_arg = fused
        config = model.config
        base = model.model
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and max_len > limit:
            raise ValueError(f"max_len={max_len} exceeds max_position_embeddings={limit}")
        self.model = model
        self.batch, self.max_len = batch, max_len
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        hidden = config.hidden_size
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.n_heads
        self.eps = float(config.rms_norm_eps)
        first = base.layers[0]
        dtype = first.input_layernorm.weight.dtype
        device = first.input_layernorm.weight.device
        self.dtype, self.device = dtype, device
        self.scaling = getattr(first.self_attn, "scaling", self.head_dim**-0.5)

        x_hidden = torch.zeros(1, hidden, dtype=dtype, device=device)
        x_attn = torch.zeros(1, self.n_heads * self.head_dim, dtype=dtype, device=device)
        self.fused = cpu_decode.available(x_hidden) if fused is None else fused
        if self.fused and not cpu_decode.available(x_hidden):
            raise ValueError(f"fused=True needs float32 on CPU with the cpu_decode ops built; "
                             f"model is {dtype} on {device}")
        self.blocks: list[_Block] = []
        inner = 1  # the widest dense MLP's inner width (the step's gate / up buffers)
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            moe = None if hasattr(mlp, "gate_proj") else mlp  # Mixtral / Qwen2-MoE blocks
            modules = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
            examples = (x_hidden, x_hidden, x_hidden, x_attn)
            if moe is None:  # (a Qwen2-MoE dense layer's width is not intermediate_size)
                width = mlp.down_proj.weight.shape[1]  # nn.Linear or QuantLinear alike
                inner = max(inner, width)
                modules += (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
                examples += (x_hidden, x_hidden,
                             torch.zeros(1, width, dtype=dtype, device=device))
            linears = [bind_linear(m, x) for m, x in zip(modules, examples, strict=True)]
            linears += [None] * (7 - len(linears))
            q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
            self.blocks.append(_Block(
                layer.input_layernorm.weight, *linears[:4], layer.post_attention_layernorm.weight,
                *linears[4:], moe=moe, modules=modules,
                q_norm=None if q_norm is None else q_norm.weight,
                k_norm=None if k_norm is None else k_norm.weight,
            ))
        self.embed = base.embed_tokens
        self.final_norm = base.norm.weight
        self.lm_head = bind_linear(model.lm_head, x_hidden)

        positions = torch.arange(max_len, device=device)[None]
        with torch.no_grad():
            cos, sin = base.rotary_emb(x_hidden[None], positions)
        half = self.head_dim // 2
        self.cos = cos[0].to(dtype)  # [max_len, head_dim]
        self.signed_sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), -1).to(dtype)
        shape = (len(self.blocks), batch, self.n_kv, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.k_layers, self.v_layers = list(self.k_cache), list(self.v_cache)  # views
        self._scratch = torch.empty(max_len, dtype=torch.float32, device=device)
        if self.fused:
            for blk, k_cache, v_cache in zip(self.blocks, self.k_layers, self.v_layers,
                                             strict=True):
                blk.attn_norm_op = cpu_decode.bind_rms_norm(blk.attn_norm, self.eps)
                blk.mlp_norm_op = cpu_decode.bind_rms_norm(blk.mlp_norm, self.eps)
                if blk.q_norm is not None:
                    blk.q_norm_op = cpu_decode.bind_rms_norm(blk.q_norm, self.eps)
                    blk.k_norm_op = cpu_decode.bind_rms_norm(blk.k_norm, self.eps)
                blk.rope = cpu_decode.bind_rope_kv(self.cos, self.signed_sin, k_cache, v_cache,
                                                   self.n_heads, self.n_kv)
                blk.attend = cpu_decode.bind_decode_attention(k_cache, v_cache, self.scaling,
                                                              self._scratch)
            self.final_norm_op = cpu_decode.bind_rms_norm(self.final_norm, self.eps)
            widths = {"h": hidden, "r": hidden, "q": self.n_heads * self.head_dim,
                      "k": self.n_kv * self.head_dim, "v": self.n_kv * self.head_dim,
                      "a": self.n_heads * self.head_dim, "o": hidden,
                      "g": inner, "u": inner, "d": hidden}
            self._step_buffers = {name: torch.zeros(batch, 1, width, dtype=dtype, device=device)
                                  for name, width in widths.items()}
            self._resolve_steps()
        self._bound_to = _binding_key(model)

    def refresh(self) -> None:
        """Bind the model again if its modules or tensors were replaced or moved since (caches
        included), else resolve the decode step's kernel entries again, for weights edited in
        place and torch's thread count as they are now. :meth:`generate` does it itself; a
        loop of your own over :meth:`forward` calls it after such changes."""
        if _binding_key(self.model) != self._bound_to:  # bound pointers would be stale
            with torch.inference_mode(False):  # as __init__
                self._build(self.model, self.batch, self.max_len, self._fused_arg)
        elif self.fused:
            self._resolve_steps()

    def _resolve_steps(self) -> None:
        """The fused one-token step as a program over fixed buffers (``_step_buffers``): per
        layer a tuple of calls with every tensor bound, the Linears through their kernels' raw
        entries where they have them, resolved for the weights and thread count as they are."""
        buf = self._step_buffers
        h, r, a, g, u = buf["h"], buf["r"], buf["a"], buf["g"], buf["u"]
        q, k, v, o, d = buf["q"], buf["k"], buf["v"], buf["o"], buf["d"]
        program = []
        for i, blk in enumerate(self.blocks):
            after = (self.blocks[i + 1].attn_norm_op if i + 1 < len(self.blocks)
                     else self.final_norm_op)
            linear = [_step_linear(module, fn, x, out) for module, fn, x, out in zip(
                blk.modules, blk.linears(), (r, r, r, a, r, r, g), (q, k, v, o, g, u, d),
                strict=False)]  # (an MoE layer binds its 4 attention Linears only)
            if blk.moe is None:
                mlp = (*linear[4:6], functools.partial(_silu_times, g, u), linear[6])
            else:  # the MoE block writes d; the other MLP slots do nothing
                mlp = (functools.partial(_moe_step, blk, r, d), _nothing, _nothing, _nothing)
            rope = blk.rope.step(q, k, v)
            if blk.q_norm_op is not None:  # per-head norms of q and k (in place) first
                q_heads, k_heads = (t.view(*t.shape[:-1], -1, self.head_dim) for t in (q, k))
                rope = functools.partial(_normed_rope, blk.q_norm_op.step(q_heads, q_heads),
                                         blk.k_norm_op.step(k_heads, k_heads), rope)
            program.append(StepLayer(
                *linear[:3], rope, blk.attend.step(q, a, self.n_heads),
                linear[3], blk.mlp_norm_op.step(h, r, o), *mlp, after.step(h, r, d),
            ))
        self._program = program
        self._first_norm = self.blocks[0].attn_norm_op.step(h, r)

    def _step(self, embedded: torch.Tensor, start: int,
              pad: torch.Tensor | None) -> torch.Tensor:
        """The fused :meth:`forward` of one token per row from its embedding ``[B, 1,
        hidden]`` (``pad``: contiguous int64 counts, or None)."""
        buf = self._step_buffers
        buf["h"].copy_(embedded.detach())
        pad_at = None if pad is None else pad.data_ptr()
        end = start + 1
        self._first_norm()
        for q, k, v, rope, attend, o, mlp_norm, gate, up, act, down, after in self._program:
            q()
            k()
            v()
            rope(start, pad_at)
            attend(end, pad_at)
            o()
            mlp_norm()
            gate()
            up()
            act()
            down()
            after()
        return self.lm_head(buf["r"][:, -1])

    def _norm(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return cpu_decode.rms_norm(h, weight, self.eps)
        # HF's RMSNorm: float32 statistics, scaled back in h's dtype (not F.rms_norm: its
        # fused CPU op took ~25-70 us per call here, timed one-off)
        h32 = h.float()
        h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h32.to(h.dtype)

    def _padded(self, pad: torch.Tensor, start: int,
                end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row rotary tables ``[B, 1, T, head_dim]`` and the attention mask ``[B, 1, T,
        end]`` for left-padded rows: causal, padding slots hidden from real tokens. A padding
        slot attends to itself only, so its (unused) keys and values stay finite."""
        slots = torch.arange(start, end, device=pad.device)
        positions = (slots[None] - pad[:, None]).clamp_min(0)  # [B, T]
        cos, sin = self.cos[positions][:, None], self.signed_sin[positions][:, None]
        return cos, sin, _padding_mask(pad, start, end)

    def _rope(self, t: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of ``t [B, heads, T, head_dim]``: HF's ``t * cos +
        rotate_half(t) * sin``, where ``rotate_half(t) = cat(-t2, t1) = roll(t, half) * [-1..,
        1..]`` (3 ops, not 7)."""
        return torch.addcmul(t * cos, t.roll(self.head_dim // 2, -1), signed_sin)

    @torch.no_grad()  # inference only (generate runs under inference_mode)
    def forward(self, ids: torch.Tensor, start: int,
                pad: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, vocab]`` of the last position for tokens ``ids [B, T]`` in cache slots
        ``start..start+T`` (their keys and values enter the cache). ``pad [B]`` (integers >= 0):
        each row's number of left-padding slots at the start of the cache; the row's token in
        slot ``s`` sits at position ``s - pad`` and never attends to the padding."""
        if self._bound_to is None:
            raise ValueError("this Decoder's last binding failed (see that error); call "
                             "refresh() or generate() to bind it again")
        batch, length = ids.shape
        end = start + length
        if batch != self.batch or start < 0 or end > self.max_len:
            raise ValueError(f"ids {tuple(ids.shape)} at start={start}: this Decoder holds "
                             f"batch {self.batch} and positions [0, {self.max_len})")
        if pad is not None and (pad.shape != (batch,) or pad.is_floating_point()
                                or pad.is_complex() or pad.dtype == torch.bool
                                or bool((pad < 0).any())):
            raise ValueError(f"pad must hold {batch} integer padding counts >= 0; got "
                             f"{pad.dtype} {pad.tolist()}")
        h = self.embed(ids)
        causal = None
        if length > 1 and start > 0:  # a chunk after cached tokens: explicit mask
            causal = torch.ones(length, end, dtype=torch.bool, device=ids.device).tril(start)
        if self.fused and self.final_norm_op is not None:  # bound when built fused
            if pad is not None:
                pad = pad.long().contiguous()  # the C ops read int64 counts
                if length > 1:  # (one token: the ops skip the padding themselves)
                    causal = _padding_mask(pad, start, end)
            if length == 1:
                return self._step(h, start, pad)
            return self.lm_head(self._fused_layers(h.contiguous(), start, causal, pad)[:, -1])
        if pad is not None:
            cos, sin, causal = self._padded(pad, start, end)
        else:
            cos, sin = self.cos[start:end], self.signed_sin[start:end]
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        for blk, k_cache, v_cache in zip(self.blocks, self.k_layers, self.v_layers, strict=True):
            r = self._norm(h, blk.attn_norm)
            q, k, v = blk.q(r), blk.k(r), blk.v(r)  # [B, T, heads * hd]
            if blk.q_norm is not None:
                q = self._norm(q.view(batch, length, nh, hd), blk.q_norm).view(q.shape)
                k = self._norm(k.view(batch, length, nkv, hd), blk.k_norm).view(k.shape)
            k_cache[:, :, start:end] = self._rope(
                k.view(batch, length, nkv, hd).transpose(1, 2), cos, sin)
            v_cache[:, :, start:end] = v.view(batch, length, nkv, hd).transpose(1, 2)
            q = self._rope(q.view(batch, length, nh, hd).transpose(1, 2), cos, sin)
            a = self._sdpa(q, k_cache, v_cache, end, causal)
            h = h + blk.o(a)
            r = self._norm(h, blk.mlp_norm)
            h = h + blk.mlp(r)
        last = self._norm(h[:, -1], self.final_norm)
        return self.lm_head(last)

    def _sdpa(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, end: int,
              causal: torch.Tensor | None) -> torch.Tensor:
        """Attention of ``q [B, heads, T, hd]`` over cache slots ``[0, end)``; ``[B, T, heads *
        hd]``."""
        batch, nh, length, hd = q.shape
        keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
        if self.n_kv != nh:  # grouped-query attention (SDPA's enable_gqa needs torch 2.5)
            keys = keys.repeat_interleave(nh // self.n_kv, dim=1)
            values = values.repeat_interleave(nh // self.n_kv, dim=1)
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=causal, is_causal=causal is None and length > 1,
            scale=self.scaling,
        ).transpose(1, 2).reshape(batch, length, nh * hd)

    def _fused_layers(self, h: torch.Tensor, start: int, causal: torch.Tensor | None,
                      pad: torch.Tensor | None) -> torch.Tensor:
        """The blocks of a several-token chunk through the bound CPU ops (attention: SDPA),
        ``h [B, T, hidden]`` updated in place (each residual add fused into the norm after it);
        returns the final norm of every position. ``pad``: as :meth:`forward`'s, with
        ``causal`` its mask."""
        batch, length = h.shape[0], h.shape[1]
        end = start + length
        blocks = self.blocks
        r = blocks[0].attn_norm_op(h)
        for i, (blk, k_cache, v_cache) in enumerate(zip(blocks, self.k_layers, self.v_layers,
                                                        strict=True)):
            q, k, v = blk.q(r), blk.k(r), blk.v(r)  # [B, T, heads * hd]
            if blk.q_norm_op is not None:
                q = blk.q_norm_op(q.view(-1, self.head_dim)).view(q.shape)
                k = blk.k_norm_op(k.view(-1, self.head_dim)).view(k.shape)
            blk.rope(q, k, v, start, pad)  # q in place, k and v into the cache
            a = self._sdpa(q.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2),
                           k_cache, v_cache, end, causal)
            r = blk.mlp_norm_op.add(h, blk.o(a))
            after = blocks[i + 1].attn_norm_op if i + 1 < len(blocks) else self.final_norm_op
            r = after.add(h, blk.mlp(r))
        return r

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, prompt + new]`` token ids: the prompt (``[B, T]``) followed by up to
        ``max_new_tokens`` tokens (greedy unless ``do_sample``). Prompts of different lengths
        come left-padded with ``attention_mask`` ``[B, T]`` (1 for tokens, 0 for padding, as a
        tokenizer with ``padding_side="left"`` makes them). Rows that emitted
        ``eos_token_id`` continue with ``pad_token_id``; decoding stops when all have."""
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(
                f"input_ids must be int64 [batch, length]; got {input_ids.dtype} "
                f"{tuple(input_ids.shape)}"
            )
        batch, length = input_ids.shape
        if batch != self.batch:
            raise ValueError(f"input_ids has batch {batch}; this Decoder was built for "
                             f"{self.batch}")
        if max_new_tokens < 1 or length < 1 or length + max_new_tokens > self.max_len:
            raise ValueError(
                f"prompt length {length} + max_new_tokens={max_new_tokens} must be in "
                f"[2, max_len={self.max_len}]"
            )
        vocab = self.model.config.vocab_size
        if eos_token_id is not None and not 0 <= pad_token_id < vocab:
            raise ValueError(f"pad_token_id={pad_token_id}; must be a token id in [0, {vocab})")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature={temperature}; must be > 0 when sampling")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k}; must be >= 1 (or None)")
        pad = None if attention_mask is None else _left_padding(attention_mask, input_ids)
        self.refresh()
        ids = input_ids.to(self.device)
        if pad is not None:
            pad = pad.to(self.device)
        out = [ids]
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        # padding tokens are never attended to; token 0 keeps the lookup valid whatever they are
        feed = ids if pad is None else ids.masked_fill(attention_mask.to(ids.device) == 0, 0)
        logits = self.forward(feed, 0, pad)
        for step in range(max_new_tokens):
            token = self._pick(logits, do_sample, temperature, top_k, generator)
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, pad_token_id), token)
                done |= token == eos_token_id
            out.append(token[:, None])
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits = self.forward(token[:, None], length + step, pad)
        return torch.cat(out, dim=1)

    @staticmethod
    def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
              generator: torch.Generator | None) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _step_linear(module: nn.Module, linear: Linear, x: torch.Tensor,
                 out: torch.Tensor) -> Callable[[], None]:
    """``out = linear(x)`` on the fused step's buffers as a call without arguments: lowbit's
    native CPU kernels through their raw C entry (a checked call costs ~6-8 us more, ~15% of a
    w4g128 step of the 19M fixture, one-off), a float ``nn.Linear`` through torch's GEMM
    writing into ``out``, anything else computed and copied."""
    raw_step = getattr(linear, "raw_step", None)
    raw = None if raw_step is None else raw_step(out)
    if raw is not None:
        x_at = x.data_ptr()

        def native() -> None:
            if raw(x_at):
                out.copy_(linear(x))  # an error status: the checked call raises it

        return native
    if type(module) is nn.Linear:  # (detached: out= refuses tensors that need gradients)
        weight_t = module.weight.detach().t()
        bias = None if module.bias is None else module.bias.detach()
        x2, out2 = x.view(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        if bias is None:
            return functools.partial(torch.mm, x2, weight_t, out=out2)
        return functools.partial(torch.addmm, bias, x2, weight_t, out=out2)
    return lambda: out.copy_(linear(x))


def _nothing() -> None:
    pass


def _normed_rope(q_norm: Callable[[], None], k_norm: Callable[[], None],
                 rope: Callable[[int, int | None], None], slot: int, pad_at: int | None) -> None:
    q_norm()
    k_norm()
    rope(slot, pad_at)


def _moe_step(blk: _Block, r: torch.Tensor, d: torch.Tensor) -> None:
    d.copy_(blk.mlp(r))


def _silu_times(gate: torch.Tensor, up: torch.Tensor) -> None:
    F.silu(gate, inplace=True).mul_(up)


def _padding_mask(pad: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """``[B, 1, T, end]``: which cache slots the tokens in slots ``start..end`` of left-padded
    rows (``pad [B]`` padding slots each) see: causal, padding hidden from real tokens; a
    padding slot sees itself only."""
    slots = torch.arange(start, end, device=pad.device)
    keys = torch.arange(end, device=pad.device)[None, None]  # [1, 1, end]
    query = slots[None, :, None]  # [1, T, 1]
    visible = (keys <= query) & (keys >= pad[:, None, None]) | (keys == query)
    return visible[:, None]


def _binding_key(model: nn.Module) -> list:
    """What the bound kernels depend on: each module's identity, forced kernel and compute
    dtype, the identity and address of its tensors, and the kernel registry and
    ``LOWBIT_KERNEL`` (once per generate call: 0.2-0.3 ms on the 19M fixture)."""
    key: list = [dispatch.registry_version(), dispatch.forced_by_environment()]
    for module in model.modules():
        attributes = module.__dict__  # (getattr: nn.Module raises for missing ones, slowly)
        key += (id(module), attributes.get("kernel"), attributes.get("weight_dtype"))
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is not None:
                key += (id(t), t.data_ptr())
    return key


def _left_padding(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Each row's number of left-padding tokens ``[B]`` from a 0/1 ``attention_mask``, or None
    when nothing is padded."""
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have input_ids' "
                         f"shape {tuple(input_ids.shape)}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold 0 (padding) and 1 (token) only")
    mask = attention_mask.to(torch.long)
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask pads on the right (or inside a prompt); pad prompts on "
                         "the left (tokenizer.padding_side = 'left')")
    pad = (mask == 0).sum(1)
    if bool((pad == mask.shape[1]).any()):
        raise ValueError("attention_mask has a row of padding only; every prompt needs a token")
    return pad if bool(pad.any()) else None


def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
             **kwargs) -> torch.Tensor:
    """One-shot :meth:`Decoder.generate` (builds the cache for this prompt; build a
    :class:`Decoder` once to reuse it across calls)."""
    decoder = Decoder(model, input_ids.shape[0], input_ids.shape[-1] + max_new_tokens)
    return decoder.generate(input_ids, max_new_tokens, **kwargs)
