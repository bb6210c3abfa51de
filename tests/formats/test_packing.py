import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats.packing import pack, packed_length, unpack

# Golden bytes, worked out by hand from the documented bit order (LSB-first bit stream per row).
GOLDEN = [
    (1, [1, 0, 1, 1, 0, 0, 0, 1, 1], "8d01"),
    (2, [0, 1, 2, 3, 3], "e403"),
    (3, [1, 2, 3, 4, 5, 6, 7, 0], "d1581f"),
    (4, [1, 2, 3], "2103"),
    (5, [0x15, 0x0A, 0x1F], "557d"),
    (6, [0x3F, 0x01, 0x2A], "7fa002"),
    (7, [0x7F, 0x00, 0x55], "7f4015"),
    (8, [0x00, 0xFF, 0x07], "00ff07"),
]


@pytest.mark.parametrize("bits,codes,hexbytes", GOLDEN)
def test_golden_bytes(bits, codes, hexbytes):
    packed = pack(torch.tensor([codes], dtype=torch.uint8), bits)
    assert bytes(packed[0].tolist()).hex() == hexbytes
    assert unpack(packed, bits, len(codes))[0].tolist() == codes


@pytest.mark.parametrize("bits", range(1, 9))
def test_every_code_value_round_trips(bits):
    codes = torch.arange(1 << bits, dtype=torch.uint8).repeat(3, 1)
    assert torch.equal(unpack(pack(codes, bits), bits, codes.shape[-1]), codes)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 4), n=st.integers(1, 70), seed=st.integers(0, 9))
def test_unpack_pack_identity(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, n), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (rows, packed_length(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


def test_three_bit_rows_take_three_eighths_byte_per_code():
    codes = torch.zeros(4096, 4096, dtype=torch.uint8)
    assert pack(codes, 3).numel() == 4096 * 4096 * 3 // 8
    # Odd row length: padding is under one byte per row.
    assert pack(torch.zeros(2, 11, dtype=torch.uint8), 3).shape == (2, 5)  # 33 bits -> 5 bytes


def test_padding_bits_are_zero():
    packed = pack(torch.full((1, 3), 7, dtype=torch.uint8), 3)  # 9 bits used of 16
    assert packed[0, 1].item() == 0b1


@pytest.mark.parametrize("bits", [0, 9, 2.0])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits="):
        pack(torch.zeros(1, 4, dtype=torch.uint8), bits)


def test_out_of_range_codes_and_dtypes():
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack(torch.tensor([[4]]), 2)
    with pytest.raises(TypeError, match="integer tensor"):
        pack(torch.zeros(1, 4), 2)
    with pytest.raises(TypeError, match="uint8"):
        unpack(torch.zeros(1, 4, dtype=torch.int32), 2, 16)
    with pytest.raises(ValueError, match="need"):
        unpack(torch.zeros(1, 3, dtype=torch.uint8), 4, 16)


def test_unpacked_codes_are_contiguous() -> None:
    codes = torch.ones(2, 5, dtype=torch.uint8)
    assert unpack(pack(codes, 3), 3, 5).view(-1).tolist() == [1] * 10


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_pack_never_returns_storage_of_its_input(bits: int) -> None:
    codes = torch.zeros(2, 16, dtype=torch.uint8)
    packed = pack(codes, bits)
    codes.fill_(1)
    assert int(packed.sum()) == 0
    strided = (torch.arange(64).reshape(8, 8).t() % (1 << bits)).to(torch.uint8)
    assert torch.equal(unpack(pack(strided, bits), bits, 8), strided)
