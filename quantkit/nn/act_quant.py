"""Online activation quantizers: what a `QuantLinear` does to its input before the weight product.

An activation quantizer belongs to one Linear. It may reshape the input space — permute channels (COMET)
or append residual channels (ARCQuant) — in which case the weight is stored for that transformed space:

    x [..., K] --transform_input--> [..., K'] --quantize (dynamic)--> x' ;  y = x' @ W'ᵀ,  W' = transform_weight(W)

`forward` is the torch reference ("fake quant": quantize then dequantize, in float): what the integer /
FP4 kernels compute, and what CPU evaluation runs. Calibration, where a format needs it, goes through a
collector that sees the Linear's calibration inputs (`collector`, then `from_calibration`).

Formats register here by name (`ACT_QUANTIZERS`) and declare their recipe keys with
`quantkit.recipe.register_act_format`. The checkpoint stores a module's `ActSpec` plus `extra_state()`
in its `quantization_config` entry and any buffers under `<module>.act.<name>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from quantkit.formats.act_int import fake_quant_act_int
from quantkit.recipe import ActSpec, register_act_format

ACT_QUANTIZERS: dict[str, type[ActQuantizer]] = {}


@dataclass(frozen=True)
class ActKernelLayout:
    """What an activation kernel needs of a calibrated activation scheme (kernels/act_dispatch.py), so that
    kernels never read a quantizer's internals. Tensors are int32 on the requested device.

    bits:       activation bits of every token group (FlexQ), or None when `block_bits` gives them per block
    block_bits: bits of each 128-channel block of the permuted input (COMET's INT4/INT8 blocks)
    perm:       the input channel order the blocks refer to (COMET)
    reorder:    the input channel order, outlier channels last (ARCQuant)
    residual:   channels whose quantization residual is appended as extra channels (ARCQuant)
    """

    bits: int | None = None
    block_bits: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    reorder: torch.Tensor | None = None
    residual: int = 0


def register_act_quantizer(cls: type[ActQuantizer]) -> type[ActQuantizer]:
    ACT_QUANTIZERS[cls.format] = cls
    return cls


class ActQuantizer(nn.Module):
    format: ClassVar[str]

    def __init__(self, spec: ActSpec, in_features: int):
        super().__init__()
        self.spec = spec
        self.in_features = in_features
        self.enabled = True  # off while the pipeline propagates calibration data (weights-only error)

    # ---- geometry: identity unless the format permutes or augments channels ----
    @property
    def weight_in_features(self) -> int:
        return self.in_features

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def transform_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w

    # ---- GPTQ: which weight columns it solves for, and over which input ----
    @property
    def gptq_in_features(self) -> int:
        """Columns GPTQ solves for (its Hessian's size): all stored columns unless `complete_gptq` derives
        some of them from the others."""
        return self.weight_in_features

    def gptq_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The [N, gptq_in_features] weight GPTQ quantizes, from the transformed weight `w`
        ([N, weight_in_features], `transform_weight`'s output)."""
        return w

    def hessian_input(self, x: torch.Tensor) -> torch.Tensor:
        """What GPTQ's Hessian is accumulated over, [..., gptq_in_features] (the un-quantized transformed
        input by default)."""
        return self.transform_input(x)

    def complete_gptq(self, codes: torch.Tensor, params: dict, fmt) -> tuple[torch.Tensor, dict]:
        """GPTQ's codes/params over `gptq_in_features` columns → the stored [N, weight_in_features] ones."""
        return codes, params

    # ---- numerics ----
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize an already transformed input [..., K']."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform_input(x)
        return self.quantize_input(x) if self.enabled else x

    # ---- calibration and persistence ----
    @classmethod
    def wants_calibration(cls, spec: ActSpec) -> bool:
        """Whether `collector` returns something for this spec (the pipeline then needs calibration data)."""
        return False

    @classmethod
    def collector(cls, spec: ActSpec, linear: nn.Module):
        """An object with `add(x)` fed every calibration input of `linear` (x: [..., K], before any
        transform), or None when this spec needs no calibration data."""
        return None

    @classmethod
    def from_calibration(cls, spec: ActSpec, linear: nn.Module, collected) -> ActQuantizer:
        return cls(spec, linear.in_features)

    def kernel_layout(self, device: torch.device | str) -> ActKernelLayout:
        """The calibrated layout the GPU kernels read (uniform `spec.bits` unless the scheme says more)."""
        return ActKernelLayout(bits=int(self.spec.bits))

    @classmethod
    def finalize_model(cls, modules: dict[str, nn.Module]) -> list[str]:
        """After the last layer, the model-wide step of this scheme over its QuantLinears (name ->
        QuantLinear, in model order), e.g. a search that gives some Linears more activation bits. Returns
        the names it changed."""
        return []

    @classmethod
    def finalize_entries(cls, entries: dict[str, dict]) -> list[str]:
        """The same step on checkpoint entries (name -> `quantization_config.modules` entry), edited in
        place: the streaming pipeline's finalize, which holds no model."""
        return []

    @classmethod
    def for_speed(cls, spec: ActSpec, in_features: int, outlier_share: float | None = None,
                  generator: torch.Generator | None = None) -> ActQuantizer:
        """A quantizer whose calibration-derived layout is made up instead of measured, for timing models
        quantized without data (`quantkit bench latency --shape`): `outlier_share` of the input channels
        (None: the format's default) at random positions count as outliers. The kernels' speed depends on
        that layout's sizes (residual channels, INT8 blocks) only, never on which channels they are."""
        return cls(spec, in_features)

    def with_spec(self, spec: ActSpec) -> ActQuantizer:
        """This quantizer under another spec of the same format, reusing its calibration (quantkit.eval.act_variants)."""
        return build_act_quantizer(spec, self.in_features, self.extra_state())

    def extra_state(self) -> dict[str, Any]:
        """JSON-able facts saved beside the spec (they must suffice to rebuild the buffers' shapes)."""
        return {}

    @classmethod
    def from_entry(cls, spec: ActSpec, in_features: int, extra: dict[str, Any]) -> ActQuantizer:
        """An instance with correctly shaped (uninitialized) buffers, for the checkpoint loader to fill."""
        return cls(spec, in_features)

    def extra_repr(self) -> str:
        g = self.spec.group_size or "token"
        return f"format={self.spec.format}, bits={self.spec.bits}, group_size={g}"


@register_act_quantizer
class IntActQuantizer(ActQuantizer):
    """Dynamic symmetric integer, per token and per group of channels (quantkit.formats.act_int).

    FlexQ: 6-bit by default, 8-bit on the Linears the sensitivity search picks (quantkit.methods.flexq).
    """

    format = "int"

    def __init__(self, spec: ActSpec, in_features: int):
        super().__init__(spec, in_features)
        self.sensitivity: float | None = None  # FlexQ search score (A6-vs-A8 damage), when measured

    @classmethod
    def wants_calibration(cls, spec: ActSpec) -> bool:
        from quantkit.methods.flexq import search_enabled

        return search_enabled(spec)

    @classmethod
    def collector(cls, spec: ActSpec, linear: nn.Module):
        from quantkit.methods.flexq import SensitivityCollector, search_enabled

        return SensitivityCollector(spec, linear) if search_enabled(spec) else None

    @classmethod
    def from_calibration(cls, spec: ActSpec, linear: nn.Module, collected) -> ActQuantizer:
        q = cls(spec, linear.in_features)
        if collected is not None:
            q.sensitivity = collected.score()
        return q

    def extra_state(self) -> dict[str, Any]:
        return {"sensitivity": self.sensitivity} if self.sensitivity is not None else {}

    @classmethod
    def from_entry(cls, spec: ActSpec, in_features: int, extra: dict[str, Any]) -> ActQuantizer:
        q = cls(spec, in_features)
        q.sensitivity = extra.get("sensitivity")
        return q

    @classmethod
    def finalize_model(cls, modules: dict[str, nn.Module]) -> list[str]:
        from quantkit.methods.flexq import select_high_precision  # FlexQ's measured A8 search

        return select_high_precision(modules)

    @classmethod
    def finalize_entries(cls, entries: dict[str, dict]) -> list[str]:
        from quantkit.methods.flexq import select_high_precision_entries

        return select_high_precision_entries(entries)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_act_int(x, self.spec.bits, self.spec.group_size or x.shape[-1])


register_act_format("int", 2, 8, 16, options=("a8_budget", "high_bits", "sensitivity"))


def build_act_quantizer(spec: ActSpec, in_features: int, extra: dict[str, Any] | None = None) -> ActQuantizer:
    cls = ACT_QUANTIZERS[spec.format]
    return cls.from_entry(spec, in_features, extra or {})
