"""Number formats: exact quantize / dequantize / pack / unpack, pure torch."""

from quantkit.formats.base import FORMATS, Params, WeightFormat, register_format
from quantkit.formats.hlq import HLQ
from quantkit.formats.int6 import Int6
from quantkit.formats.nvfp4 import NVFP4Format
from quantkit.formats.packing import pack_codes, unpack_codes
from quantkit.formats.uniform import UniformInt


def make_format(spec) -> WeightFormat:
    """Build the format object for a recipe `WeightSpec` (format name + its settings)."""
    cls = FORMATS[spec.format]
    return cls.from_spec(spec) if hasattr(cls, "from_spec") else cls(
        bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric
    )


__all__ = ["FORMATS", "HLQ", "Int6", "NVFP4Format", "Params", "UniformInt", "WeightFormat", "make_format",
           "pack_codes", "register_format", "unpack_codes"]
