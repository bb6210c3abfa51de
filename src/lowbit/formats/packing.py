"""Dense bit packing of 1..8-bit unsigned codes into bytes.

Bit order (pinned by golden-byte tests): each row (the last dim) is one little-endian bit stream.
Code ``i`` of a row occupies stream bits ``[i*b, (i+1)*b)``, least significant bit first, and
stream bit ``k`` is bit ``k % 8`` (LSB = 0) of byte ``k // 8``. So for 4 bits byte j holds
``code[2j] | code[2j+1] << 4``; for 3 bits, bytes 0..2 hold codes 0..7 as one 24-bit
little-endian integer. A row of n codes takes ``ceil(n*b/8)`` bytes: the padding is less than
one byte per row, and padding bits are zero.
"""

from __future__ import annotations

import torch


def packed_length(n: int, bits: int) -> int:
    """Bytes taken by a row of ``n`` codes of ``bits`` bits."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r}; allowed: an int from 1 to 8")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[..., n]`` (each < 2**bits) into uint8 ``[..., ceil(n*bits/8)]``."""
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
        raise TypeError(f"pack needs an integer tensor of codes, got dtype {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("pack needs at least one dim (the row to pack), got a 0-d tensor")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(
            f"codes must lie in [0, {(1 << bits) - 1}] for bits={bits}, got range "
            f"[{int(codes.min())}, {int(codes.max())}]"
        )
    if bits == 8:  # a copy even of a contiguous uint8 input: the caller owns what it gets
        return codes.to(torch.uint8, memory_format=torch.contiguous_format, copy=True)
    *lead, n = codes.shape
    per_byte = 8 // bits
    if 8 % bits == 0 and n % per_byte == 0:  # 1, 2, 4 bits: whole codes per byte, uint8 math
        grouped = codes.to(torch.uint8).reshape(*lead, n // per_byte, per_byte)
        out = grouped[..., 0].clone()
        for j in range(1, per_byte):
            out |= grouped[..., j] << (j * bits)
        return out
    out_len = packed_length(n, bits)
    groups = -(-n // 8)
    padded = codes.to(torch.uint8)
    if groups * 8 != n:
        padded = torch.nn.functional.pad(padded, (0, groups * 8 - n))
    eight = padded.reshape(*lead, groups, 8)
    # 8 codes of b bits -> one integer of 8*b <= 56 bits -> b little-endian bytes; one op per
    # code and per byte on [..., groups] (int32 holds 8 * 3 = 24 bits, int64 the rest)
    wide = torch.int32 if bits <= 3 else torch.int64
    word = eight[..., 0].to(wide)
    for i in range(1, 8):
        word |= eight[..., i].to(wide) << (i * bits)
    stream = torch.empty(*lead, groups, bits, dtype=torch.uint8, device=codes.device)
    for j in range(bits):
        stream[..., j] = (word >> (8 * j)) & 0xFF
    return stream.reshape(*lead, groups * bits)[..., :out_len].contiguous()


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``[..., ceil(n*bits/8)]`` -> uint8 codes ``[..., n]``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack needs a uint8 tensor, got dtype {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("unpack needs at least one dim, got a 0-d tensor")
    expected = packed_length(n, bits)
    if packed.shape[-1] != expected:
        raise ValueError(
            f"packed rows have {packed.shape[-1]} bytes; {n} codes of {bits} bits need {expected}"
        )
    if bits == 8:
        return packed.clone()
    *lead, _ = packed.shape
    per_byte = 8 // bits
    if 8 % bits == 0 and n % per_byte == 0:
        mask = (1 << bits) - 1
        parts = [(packed >> (j * bits)) & mask for j in range(per_byte)]
        return torch.stack(parts, -1).reshape(*lead, n)
    groups = -(-n // 8)
    stream = packed
    if groups * bits != expected:
        stream = torch.nn.functional.pad(packed, (0, groups * bits - expected))
    bytes_ = stream.reshape(*lead, groups, bits)
    wide = torch.int32 if bits <= 3 else torch.int64  # holds 8 * bits bits
    word = bytes_[..., 0].to(wide)
    for j in range(1, bits):
        word |= bytes_[..., j].to(wide) << (8 * j)
    codes = torch.empty(*lead, groups, 8, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    for i in range(8):
        codes[..., i] = (word >> (i * bits)) & mask
    return codes.reshape(*lead, groups * 8)[..., :n].contiguous()
