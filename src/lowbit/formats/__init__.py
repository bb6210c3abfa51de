"""Number formats (bit layouts, value tables, inspect) and bit packing."""

from lowbit.formats.packing import pack, packed_length, unpack

__all__ = ["pack", "packed_length", "unpack"]
