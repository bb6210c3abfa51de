"""Export to GGUF, the single-file format of llama.cpp (and of Ollama, LM Studio, ...).

``lowbit.save(model, out, format="gguf")`` writes ``out/model.gguf``: the model's hyper-parameters
and its tokenizer as GGUF metadata, every tensor under llama.cpp's names. Quantized layers map
onto GGUF's block types without re-quantizing (lowbit's codes, in ggml's bit order):

=====================  ======  ===========================================================
lowbit spec            GGUF    value of code q (block of 32 weights, fp16 scale d)
=====================  ======  ===========================================================
``int4-g32-sym``       Q4_0    ``d * (q - 8)``: lowbit's ``s * q`` exactly
``int8-g32-sym``       Q8_0    ``d * q``: exactly
``int5-g32-sym``       Q5_0    ``d * (q - 16)``: exactly
``uint4-g32`` (asym)   Q4_1    ``d * q + m`` with ``m = -s * z`` rounded to fp16
``uint5-g32`` (asym)   Q5_1    as Q4_1
``q4_k`` (k-quant)     Q4_K    ``d*sc*q - dmin*m``: 6-bit ``sc``/``m`` per 32, fp16 ``d``/``dmin``
                               per 256 (lowbit's scale codes and super-scales as they are)
``q5_k``               Q5_K    as Q4_K with 5-bit codes
``q6_k``               Q6_K    ``d*sc*(q - 32)``: signed 8-bit ``sc`` per 16, fp16 ``d`` per 256
=====================  ======  ===========================================================

(presets ``q4_0``, ``q8_0``, ``q5_0``, ``q4_1``, ``q5_1``, ``q4_k``, ``q5_k``, ``q6_k`` name these
specs, with the fp16 scales the blocks store; k-quant blocks hold 256 weights, so their layers'
input widths must be multiples of 256 (llama.cpp falls back to Q5_0 / Q5_1 / Q8_0 for others:
give such layers those specs); ``q4_0`` and ``q5_0`` choose scales as llama.cpp does,
``-full``: the block's largest-magnitude value on code 0, ``d`` negative where that value is
positive). Float tensors
are written F32 (1-D: norms) or in their stored float16. Architectures: llama and mistral (GGUF
arch ``llama``; q / k rows and biases permuted to ggml's rotary layout, as llama.cpp's converter
does; Llama 3's rotary scaling as ``rope_freqs``). The tokenizer comes from the folder the model
was loaded from: a SentencePiece BPE ``tokenizer.model`` (llama.cpp's "llama": pieces, scores,
space prefix; Llama 2, Mistral) or a byte-level BPE ``tokenizer.json`` with GPT-2's or Llama 3's
split ("gpt2": tokens, merges); special tokens, add-BOS/EOS flags and the chat template are read
by gguf's own ``SpecialVocab``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.nn.modules import QuantEmbedding, QuantLinear
from lowbit.spec import QuantSpec

FORMAT_NAME = "gguf"
FILE_NAME = "model.gguf"
_ARCHS = {"llama": "llama", "mistral": "llama"}
# (format, symmetric) of a group-of-32 fp16-scale spec -> GGUF block type name
_BLOCK_TYPES = {("int4", True): "Q4_0", ("int8", True): "Q8_0", ("int5", True): "Q5_0",
                ("uint4", False): "Q4_1", ("uint5", False): "Q5_1"}
# k-quants: (format, group size, scale bits, groups per super-block, full range) -> type
_K_TYPES = {("uint2", 16, 4, 16, False): "Q2_K", ("int3", 16, 6, 16, True): "Q3_K",
            ("uint4", 32, 6, 8, False): "Q4_K", ("uint5", 32, 6, 8, False): "Q5_K",
            ("int6", 16, 8, 16, True): "Q6_K"}
K_BLOCK = 256  # weights per k-quant super-block (ggml's QK_K)


def gguf_type(spec: QuantSpec) -> str | None:
    """The GGUF block type lowbit's ``spec`` stores exactly (Q4_1 / Q5_1: up to the fp16 offset),
    or None."""
    if (spec.granularity != "group" or spec.scale_dtype != "float16" or spec.act is not None
            or spec.kind != "affine"):
        return None
    if spec.double_quantized:
        if spec.has_zero_point and spec.zero_dtype != "float16":
            return None
        return _K_TYPES.get((spec.format, spec.group_size, spec.scale_bits, spec.super_group,
                             spec.full_range))
    if spec.group_size != 32 or (spec.has_zero_point and spec.zero_point != "int"):
        return None
    return _BLOCK_TYPES.get((spec.format, spec.symmetric))


def check_spec(spec: QuantSpec, layer: str | None = None) -> None:
    """Raise ValueError if (``layer``'s) ``spec`` has no GGUF block type."""
    if gguf_type(spec) is None:
        where = f"layer {layer!r} ({spec})" if layer is not None else f"spec {spec}"
        raise ValueError(f"{where} has no GGUF block type; GGUF stores groups of 32 with an "
                         "fp16 scale: presets q4_0, q8_0, q5_0 (symmetric), q4_1, q5_1 "
                         "(asymmetric), or the k-quants q2_k, q3_k, q4_k, q5_k, q6_k")


# llama.cpp's type for a k-quant tensor whose rows do not hold whole super-blocks (for Q2_K
# and Q3_K it takes IQ4_NL, a 4-bit codebook lowbit does not write: q4_0 instead)
K_FALLBACKS = {"Q2_K": "q4_0", "Q3_K": "q4_0", "Q4_K": "q5_0", "Q5_K": "q5_1", "Q6_K": "q8_0"}


def k_quant_fallbacks(model: nn.Module, spec: str | QuantSpec) -> dict[str, str | QuantSpec]:
    """``{layer: fallback, ..., "*": spec}`` for :func:`lowbit.quantize`: a k-quant ``spec``
    (q2_k ... q6_k) with llama.cpp's fallback (q5_0 for q4_k, q5_1 for q5_k, q8_0 for q6_k;
    q4_0 for q2_k / q3_k, where llama.cpp takes IQ4_NL) for each Linear /
    Embedding whose rows are not a multiple of 256 weights, as llama.cpp's quantizer does;
    ``{"*": spec}`` for other specs."""
    import re

    from lowbit.spec import as_spec

    spec = as_spec(spec)
    kind = gguf_type(spec)
    out: dict[str, str | QuantSpec] = {}
    if kind in K_FALLBACKS:
        for name, module in model.named_modules():
            width = (module.in_features if isinstance(module, (nn.Linear, QuantLinear)) else
                     module.embedding_dim if isinstance(module, (nn.Embedding, QuantEmbedding))
                     else None)
            if width is not None and width % K_BLOCK:
                out[f"re:^{re.escape(name)}$"] = K_FALLBACKS[kind]
    out["*"] = spec
    return out


def check_model_type(model_type: str | None) -> str:
    """GGUF's architecture name for a transformers ``model_type`` (ValueError if none)."""
    if model_type not in _ARCHS:
        raise ValueError(f"model_type {model_type!r}: the GGUF export writes "
                         f"{', '.join(_ARCHS)} models")
    return _ARCHS[model_type]


def _blocks(module: nn.Module, name: str) -> tuple[torch.Tensor, str]:
    """uint8 ``[rows, bytes per row]`` of ggml blocks for a quantized 2-D weight, and its type."""
    qt = module.qweight
    check_spec(qt.spec, name)
    kind = gguf_type(qt.spec)
    if qt.g_idx is not None:
        raise ValueError(f"layer {name!r}: GPTQ act-order groups (g_idx) have no GGUF form; "
                         "quantize with GPTQ(act_order=False) or static_groups=True")
    rows, cols = qt.shape
    if kind.endswith("_K"):
        if cols % K_BLOCK:
            raise ValueError(f"layer {name!r} has {cols} inputs: {kind} blocks hold {K_BLOCK} "
                             f"weights of a row; quantize this layer with {K_FALLBACKS[kind]} "
                             "(llama.cpp's fallback; lowbit.io.gguf.k_quant_fallbacks) or "
                             "another type of groups of 32")
        return _k_blocks(qt, kind), kind
    codes = qt.codes().reshape(rows, cols // 32, 32)  # q - qmin, unsigned
    scale = qt.scale.reshape(rows, cols // 32, 1).to(torch.float16)
    d = scale.view(torch.uint8)  # [rows, n, 2], little-endian fp16
    bits = qt.spec.bits
    parts = [d]
    if qt.spec.has_zero_point:  # x = d * q + m
        zero = qt.zero_point.reshape(rows, cols // 32, 1).float()
        m = (-scale.float() * zero).to(torch.float16)
        parts.append(m.view(torch.uint8))
    if bits == 8:
        parts.append((codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8))
    else:  # byte j: low nibble code j, high nibble code j + 16 (ggml's order)
        low = codes & 0x0F
        parts.append(low[..., :16] | (low[..., 16:] << 4))
        if bits == 5:  # the fifth bits, as one little-endian uint32 (bit j = code j)
            high = ((codes >> 4) & 1).to(torch.int64) << torch.arange(32)
            word = high.sum(-1, keepdim=True)
            parts.insert(-1, torch.cat([(word >> (8 * i)) & 0xFF for i in range(4)], -1)
                         .to(torch.uint8))
    return torch.cat(parts, -1).reshape(rows, -1).contiguous(), kind


def _k_blocks(qt: Any, kind: str) -> torch.Tensor:
    """uint8 ``[rows, bytes per row]`` of Q2_K ... Q6_K super-blocks (256 weights each) in
    ggml's layout, from lowbit's codes, scale codes and fp16 super-scales as they are."""
    rows, cols = qt.shape
    n = cols // K_BLOCK
    codes = qt.codes().reshape(rows, n, K_BLOCK)  # unsigned: q (Q4_K, Q5_K), q + 32 (Q6_K)
    sc = qt.qparams.scale_codes
    d = sc.super_scale.reshape(rows, n, 1).view(torch.uint8)  # little-endian fp16
    scales = sc.scale.reshape(rows, n, -1)
    if kind == "Q2_K":  # per 128 codes: byte l holds codes 32 j + l at bits 2 j
        pieces = codes.reshape(rows, n, 2, 4, 32).to(torch.int32)
        qs = sum(pieces[..., j, :] << (2 * j) for j in range(4)).to(torch.uint8)
        packed = (scales & 0x0F) | (sc.minimum.reshape(rows, n, 16) << 4)
        dmin = sc.super_min.reshape(rows, n, 1).view(torch.uint8)
        return torch.cat([packed, qs.reshape(rows, n, 64), d, dmin], -1).reshape(rows, -1) \
            .contiguous()
    if kind == "Q3_K":  # codes q + 4: low 2 bits as Q2_K's, the third in hmask
        pieces = codes.reshape(rows, n, 2, 4, 32).to(torch.int32)
        qs = sum((pieces[..., j, :] & 3) << (2 * j) for j in range(4)).to(torch.uint8)
        high = (pieces >> 2) & 1  # bit 4 h + j of hmask byte l: code 128 h + 32 j + l
        hmask = sum(high[:, :, h, j, :] << (4 * h + j) for h in range(2) for j in range(4))
        # 16 six-bit codes (ggml's scale + 32, lowbit's offset code as it is) in 12 bytes:
        # bytes 0-7 low nibbles of codes 0-7 | codes 8-15's << 4; byte 8 + k: the high 2 bits
        # of codes k, 4 + k, 8 + k, 12 + k at bits 0, 2, 4, 6
        s = scales.to(torch.int32)
        low = (s[..., :8] & 0x0F) | ((s[..., 8:] & 0x0F) << 4)
        top = sum(((s[..., 4 * i:4 * i + 4] >> 4) & 3) << (2 * i) for i in range(4))
        packed = torch.cat([low, top], -1).to(torch.uint8)
        return torch.cat([hmask.to(torch.uint8), qs.reshape(rows, n, 64), packed, d], -1) \
            .reshape(rows, -1).contiguous()
    if kind == "Q6_K":
        halves = codes.reshape(rows, n, 2, 128)  # each half: codes 0..63 low nibbles, 64..127 high
        ql = (halves[..., :64] & 0x0F) | ((halves[..., 64:] & 0x0F) << 4)
        pieces = (halves.reshape(rows, n, 2, 4, 32) >> 4).to(torch.int32)
        qh = sum((pieces[..., k, :] & 3) << (2 * k) for k in range(4)).to(torch.uint8)
        signed = (scales.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)
        parts = [ql.reshape(rows, n, 128), qh.reshape(rows, n, 64), signed, d]
        return torch.cat(parts, -1).reshape(rows, -1).contiguous()
    mins = sc.minimum.reshape(rows, n, 8)
    dmin = sc.super_min.reshape(rows, n, 1).view(torch.uint8)
    # 8 six-bit scales and mins in 12 bytes: bytes 0-3 scales 0-3 (high 2 bits: scales 4-7's
    # bits 4-5), 4-7 mins 0-3 (likewise), 8-11 low nibbles of scales 4-7 | mins 4-7 << 4
    packed = torch.cat([
        (scales[..., :4] & 63) | ((scales[..., 4:] >> 4) << 6),
        (mins[..., :4] & 63) | ((mins[..., 4:] >> 4) << 6),
        (scales[..., 4:] & 0x0F) | ((mins[..., 4:] & 0x0F) << 4)], -1)
    chunks = codes.reshape(rows, n, 4, 2, 32)  # per 64 codes: first 32 low nibbles, next high
    qs = ((chunks[..., 0, :] & 0x0F) | ((chunks[..., 1, :] & 0x0F) << 4)).reshape(rows, n, 128)
    parts = [d, dmin, packed]
    if kind == "Q5_K":  # bit i of byte l: the fifth bit of code 32 * i + l
        fifth = ((codes.reshape(rows, n, 8, 32) >> 4) & 1).to(torch.int32)
        parts.append(sum(fifth[..., i, :] << i for i in range(8)).to(torch.uint8))
    parts.append(qs)
    return torch.cat(parts, -1).reshape(rows, -1).contiguous()


def _permute_rotary(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q / k (HF's half-split rotary layout) in ggml's interleaved order."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2) \
        .reshape(t.shape)


# Llama 3's split before byte-level BPE: llama.cpp's "llama-bpe" pre-tokenizer applies it
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer_name(pre: dict[str, Any]) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer it reproduces: "gpt-2" (ByteLevel with
    GPT-2's split) or "llama-bpe" (Llama 3's split, then ByteLevel without its own); None."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) \
            and not pre.get("add_prefix_space"):
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and len(parts) == 2:
        split, byte_level = parts
        if (split.get("type") == "Split" and (split.get("pattern") or {}).get("Regex")
                == LLAMA3_SPLIT and split.get("behavior") == "Isolated"
                and not split.get("invert") and byte_level.get("type") == "ByteLevel"
                and not byte_level.get("use_regex", True)
                and not byte_level.get("add_prefix_space")):
            return "llama-bpe"
    return None


def check_tokenizer(source: Path) -> tuple[str, str]:
    """``(tokenizer model, pre-tokenizer)`` as llama.cpp names them for the folder's tokenizer
    if llama.cpp reproduces it, else ValueError: ``("gpt2", name)`` for a byte-level BPE
    ``tokenizer.json`` with GPT-2's or Llama 3's split, no normalizer and no prefix space;
    otherwise ``("llama", "default")`` for a SentencePiece BPE ``tokenizer.model`` (as
    llama.cpp's converter prefers it)."""
    from transformers import AutoTokenizer

    source = Path(source)
    tokenizer_file = source / "tokenizer.json"
    spec = (json.loads(tokenizer_file.read_text(encoding="utf-8"))
            if tokenizer_file.is_file() else {})
    pre = spec.get("pre_tokenizer") or {}
    name = _pre_tokenizer_name(pre)
    sentencepiece = (source / SENTENCEPIECE_FILE).is_file() and name is None
    if not sentencepiece and not tokenizer_file.is_file():
        raise ValueError(f"{source} has neither tokenizer.json nor {SENTENCEPIECE_FILE}; GGUF "
                         "carries the tokenizer, so the model must come from a folder with one")
    # a model file that is not SentencePiece fails here, before HF tries to load it
    parsed = _sentencepiece(source) if sentencepiece else None
    tok = AutoTokenizer.from_pretrained(source)
    stripping = [t.content for t in (getattr(tok, "added_tokens_decoder", None) or {}).values()
                 if getattr(t, "lstrip", False) or getattr(t, "rstrip", False)]
    if stripping:
        raise ValueError(f"{source}: added token {stripping[0]!r} strips the spaces around it "
                         "(lstrip / rstrip), which GGUF cannot record (llama.cpp's token ids "
                         "would differ)")
    if parsed is not None:
        _check_sentencepiece(source, tok, *parsed)
        return "llama", "default"
    model = spec.get("model") or {}
    prefix = pre.get("add_prefix_space") or any(p.get("add_prefix_space")
                                                for p in pre.get("pretokenizers") or [])
    found = (f"a {model.get('type')} model with a {pre.get('type')} pre-tokenizer"
             + (" that sets add_prefix_space" if prefix else "")
             + (" and a normalizer" if spec.get("normalizer") else ""))
    if model.get("type") != "BPE" or name is None or spec.get("normalizer"):
        raise ValueError(f"{tokenizer_file}: {found}; the GGUF export writes byte-level BPE "
                         "tokenizers llama.cpp reproduces (GPT-2's or Llama 3's split, no "
                         f"normalizer, no prefix space) and SentencePiece BPE "
                         f"({SENTENCEPIECE_FILE})")
    return "gpt2", name


SENTENCEPIECE_FILE = "tokenizer.model"
# a probe the HF tokenizer and tokenizer.model must split alike (spaces, newlines, digits)
_PROBE = "Hello  world,\n\n the 2024 year's\tend ."


def _sentencepiece(source: Path) -> tuple[Any, Any]:
    """The folder's SentencePiece processor and model proto (ImportError naming the packages,
    ValueError for a file that is not a SentencePiece model)."""
    try:
        from google.protobuf.message import DecodeError
        from sentencepiece import SentencePieceProcessor
        from sentencepiece import sentencepiece_model_pb2 as model_pb2
    except ImportError as e:
        raise ImportError(f"{source / SENTENCEPIECE_FILE} is a SentencePiece model; reading it "
                          "needs `pip install sentencepiece protobuf`") from e
    data = (source / SENTENCEPIECE_FILE).read_bytes()
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError:
        proto.Clear()
    if not proto.pieces:
        raise ValueError(f"{source / SENTENCEPIECE_FILE} is not a SentencePiece model, and the "
                         "folder has no byte-level BPE tokenizer.json; the GGUF export writes "
                         "those two kinds")
    return SentencePieceProcessor(model_proto=data), proto


def _check_sentencepiece(source: Path, tok: Any, processor: Any, proto: Any) -> None:
    """A SentencePiece model (``processor``, ``proto``) llama.cpp's "llama" tokenizer
    reproduces: BPE pieces merged by score, byte fallback, no normalization beyond the space
    prefix, split as ``tok`` (the HF tokenizer) splits plain text."""
    where = source / SENTENCEPIECE_FILE
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        kind = proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)
        raise ValueError(f"{where}: a SentencePiece {kind} model; the GGUF export writes "
                         "SentencePiece BPE (llama.cpp merges pieces by score)")
    if not proto.trainer_spec.byte_fallback:
        raise ValueError(f"{where}: a SentencePiece model without byte fallback; llama.cpp "
                         "aborts on a character outside its vocabulary unless <0xXX> pieces "
                         "exist")
    norm = proto.normalizer_spec
    if norm.name not in ("", "identity") or norm.remove_extra_whitespaces:
        raise ValueError(f"{where}: SentencePiece normalization {norm.name!r}"
                         f"{' removing extra whitespace' if norm.remove_extra_whitespaces else ''}"
                         "; llama.cpp only adds the space prefix (normalizer 'identity')")
    hf = tok(_PROBE, add_special_tokens=False)["input_ids"]
    if hf != processor.encode(_PROBE):
        raise ValueError(f"{source}: the HF tokenizer splits {_PROBE!r} as {hf}, "
                         f"{SENTENCEPIECE_FILE} as {processor.encode(_PROBE)}; llama.cpp would "
                         f"follow {SENTENCEPIECE_FILE}")


def check_model(config: Any, source: str | Path | None) -> str:
    """GGUF's architecture for ``config`` once everything the export needs is there (the arch,
    default rotary parameters, a tokenizer it can write); ValueError naming what is not."""
    arch = check_model_type(getattr(config, "model_type", None))
    rope = _rope(config)
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "llama3"):
        raise ValueError(f"rotary parameters {rope!r}: the GGUF export writes rope_type "
                         "'default' and 'llama3' (as per-frequency factors)")
    if source is None or not Path(source).is_dir():
        raise ValueError("the model has no source folder (load it with lowbit.models.hf."
                         "load_hf_model or lowbit.load): GGUF needs its tokenizer files")
    check_tokenizer(Path(source))
    return arch


def _rope(config: Any) -> dict[str, Any]:
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
                or {})


def _rope_freq_factors(model: nn.Module, config: Any, head_dim: int,
                       theta: float) -> torch.Tensor | None:
    """ggml's ``rope_freqs`` for Llama 3's rotary scaling: the default inverse frequencies over
    the model's own (ggml divides each rotation angle by its factor); None for plain RoPE."""
    rope = _rope(config)
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        return None
    rotary = next((m for m in model.modules() if isinstance(getattr(m, "inv_freq", None),
                                                           torch.Tensor)), None)
    if rotary is None or getattr(rotary, "attention_scaling", 1.0) != 1.0:
        raise ValueError(f"rotary parameters {rope!r}: no rotary module with plain attention "
                         "scaling to read the frequencies from")
    default = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return (default / rotary.inv_freq.double()).float()


def _tokenizer_metadata(writer: Any, source: Path, vocab_size: int) -> None:
    """GGUF tokenizer keys from a HF tokenizer folder: llama.cpp's "gpt2" (byte-level BPE:
    tokens and merges) or "llama" (SentencePiece BPE: pieces and their scores)."""
    import gguf
    from transformers import AutoTokenizer

    model, pre = check_tokenizer(source)
    tok = AutoTokenizer.from_pretrained(source)
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    if model == "llama":  # as llama.cpp's converter: pieces, scores, types from the model file
        processor, proto = _sentencepiece(source)
        scores = [-10000.0] * vocab_size
        for i in range(min(processor.vocab_size(), vocab_size)):
            tokens[i], scores[i] = processor.id_to_piece(i), processor.get_score(i)
            types[i] = (gguf.TokenType.UNKNOWN if processor.is_unknown(i)
                        else gguf.TokenType.CONTROL if processor.is_control(i)
                        else gguf.TokenType.UNUSED if processor.is_unused(i)
                        else gguf.TokenType.BYTE if processor.is_byte(i)
                        else gguf.TokenType.NORMAL)
        for i, token in added.items():
            if i < vocab_size:
                special = getattr(token, "special", False)
                tokens[i] = token.content if special else token.content.replace("\u2581", " ")
                types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
                scores[i] = -1000.0
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(bool(proto.normalizer_spec.add_dummy_prefix))
    else:
        for t, i in tok.get_vocab().items():
            if i < vocab_size:
                tokens[i] = t
                types[i] = (gguf.TokenType.NORMAL if i not in added
                            else gguf.TokenType.CONTROL if getattr(added[i], "special", False)
                            else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # merges (byte-level BPE), special token ids and the chat template, read as llama.cpp's
    # converter reads them; add-BOS / add-EOS as the tokenizer behaves (llama.cpp's default
    # when the key is absent depends on the pre-tokenizer: true for llama-bpe)
    vocab_log = logging.getLogger("gguf.vocab")  # its guesses at add-BOS/EOS are replaced
    level = vocab_log.level
    vocab_log.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(source, load_merges=model == "gpt2", n_vocab=vocab_size)
    finally:
        vocab_log.setLevel(level)
    probe = tok("a")["input_ids"]
    special.add_special_token = {
        "bos": tok.bos_token_id is not None and len(probe) > 1 and probe[0] == tok.bos_token_id,
        "eos": tok.eos_token_id is not None and len(probe) > 1 and probe[-1] == tok.eos_token_id}
    special.add_to_gguf(writer, quiet=True)


def write_gguf(model: nn.Module, path: Path,
               float_dtype: torch.dtype | None) -> tuple[int, int]:
    """Write ``model`` (quantized or float, llama / mistral) to the file ``path``; returns the
    bytes of its quantized tensors (blocks with their scales) and of its float tensors."""
    import gguf

    config = model.config
    source = getattr(model, "_lowbit_source", None)
    arch = check_model(config, source)
    rope = _rope(config)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    modules = dict(model.named_modules())
    tensors: list[tuple[str, Any, Any]] = []  # (gguf name, array, raw dtype)
    quantized_bytes, float_bytes, types = 0, 0, []
    state = model.state_dict()
    # llama.cpp reads the head from token_embd when output.weight is absent: drop it only when
    # it is the embedding's very tensor (a float tied model), never when quantized apart
    head = getattr(model, "lm_head", None)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    shared_head = (isinstance(head, nn.Linear) and isinstance(embed, nn.Embedding)
                   and head.weight.data_ptr() == embed.weight.data_ptr())

    def heads_of(module_name: str) -> int:
        return heads if module_name.endswith("q_proj") else kv_heads

    for module_name, module in modules.items():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            data, kind = _blocks(module, module_name)
            if module_name.endswith(("q_proj", "k_proj")):
                data = _permute_rotary(data, heads_of(module_name))
            target = names.get_name(module_name + ".weight", try_suffixes=(".weight",))
            if target is None:
                raise ValueError(f"layer {module_name!r} has no GGUF name for arch {arch}")
            tensors.append((target, data.numpy(), getattr(gguf.GGMLQuantizationType, kind)))
            quantized_bytes += data.numel()
            types.append(kind)
    for key, t in state.items():
        owner, _, leaf = key.rpartition(".")
        if (isinstance(modules.get(owner), (QuantLinear, QuantEmbedding)) and leaf != "bias") \
                or (key == "lm_head.weight" and shared_head):
            continue
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"tensor {key!r} has no GGUF name for arch {arch}")
        t = t.detach().float()
        if owner.endswith(("q_proj", "k_proj")):  # weight rows and bias alike
            t = _permute_rotary(t, heads_of(owner))
        stored = torch.float16 if (float_dtype == torch.float16 and t.dim() > 1) else \
            torch.float32  # ggml keeps 1-D tensors (norms) in F32
        tensors.append((target, t.to(stored).numpy(), None))
        float_bytes += t.numel() * stored.itemsize

    theta = float(rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)
    factors = _rope_freq_factors(model, config, head_dim, theta)
    if factors is not None:
        tensors.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                        factors.numpy(), None))
        float_bytes += factors.numel() * 4
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(Path(source).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)  # llama.cpp assumes hidden / heads without them
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_type = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
                 "Q3_K": 12, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18}
    most = max(set(types), key=types.count) if types else None  # informational in GGUF
    writer.add_file_type(file_type[most] if most else 1 if float_dtype == torch.float16 else 0)
    _tokenizer_metadata(writer, Path(source), config.vocab_size)
    for target, array, raw in tensors:
        writer.add_tensor(target, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantized_bytes, float_bytes
