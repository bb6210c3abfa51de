"""Number formats (bit layouts, value tables, inspect) and bit packing."""

from lowbit.formats.codebooks import NF4_VALUES, CodebookFormat, pow2_values
from lowbit.formats.floats import FloatFormat
from lowbit.formats.inspect import explain
from lowbit.formats.integers import IntFormat
from lowbit.formats.packing import pack, packed_length, unpack
from lowbit.formats.registry import format_table, get_format, list_formats

__all__ = [
    "NF4_VALUES",
    "CodebookFormat",
    "FloatFormat",
    "IntFormat",
    "explain",
    "format_table",
    "get_format",
    "list_formats",
    "pack",
    "packed_length",
    "pow2_values",
    "unpack",
]
