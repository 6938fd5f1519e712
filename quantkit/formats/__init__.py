"""Number formats: exact quantize / dequantize / pack / unpack, pure torch."""

from quantkit.formats.base import FORMATS, Params, RecipeKey, TensorSpec, WeightFormat, register_format
from quantkit.formats.hlq import HLQ
from quantkit.formats.int6 import Int6
from quantkit.formats.nvfp4 import NVFP4Format
from quantkit.formats.packing import pack_codes, unpack_codes
from quantkit.formats.uniform import UniformInt


def make_format(spec) -> WeightFormat:
    """Build the format object for a recipe `WeightSpec` (format name + its settings)."""
    return FORMATS[spec.format].from_spec(spec)


def packed_tensors(spec, out_features: int, in_features: int) -> dict[str, TensorSpec]:
    """The tensors a Linear quantized with recipe `WeightSpec` `spec` stores: {name: TensorSpec(shape, dtype)}
    (its format's declaration, `WeightFormat.packed_tensors`)."""
    return make_format(spec).packed_tensors(out_features, in_features)


__all__ = ["FORMATS", "HLQ", "Int6", "NVFP4Format", "Params", "RecipeKey", "TensorSpec", "UniformInt",
           "WeightFormat", "make_format", "pack_codes", "packed_tensors", "register_format", "unpack_codes"]
