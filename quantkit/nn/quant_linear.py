"""Runtime Linear modules that hold packed quantized weights.

`QuantLinear` is format-generic: it holds the tensors its format's `pack` produced (as buffers, so they
travel with `.to()` and land in the state dict under `<module>.<name>`) and computes

    y = x @ dequantize(packed)[:, :in_features]ᵀ + bias

With an activation quantizer `act` (quantkit.nn.act_quant) the input is first transformed and quantized
online, and the packed weight spans the transformed input (`weight_in_features` columns):

    y = act(x) @ dequantize(packed)[:, :weight_in_features]ᵀ + bias

On CUDA a kernel registered in `KERNELS` under `kernel_key` (the weight format, or "<act>:<weight>")
serves the forward instead (the kernels register themselves on first use: `load_kernels`, which imports
`quantkit.kernels.registry`; quantkit.nn never imports the kernels at import time); the torch reference above
is what CPU runs and what kernels are tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.formats import make_format
from quantkit.recipe import WeightSpec

# format name -> fn(module, x) returning y, or None to fall back to the torch reference
KERNELS: dict[str, Callable[[QuantLinear, torch.Tensor], torch.Tensor | None]] = {}
_KERNELS_LOADED = [False]


def load_kernels() -> dict:
    """Let the GPU kernels register themselves in `KERNELS` (once; `quantkit.kernels.registry`, CUDA + triton
    only) and return the table. quantkit.nn never imports the kernels at import time: the first CUDA forward of
    a QuantLinear calls this, and so should code that reads `KERNELS` before any forward."""
    if not _KERNELS_LOADED[0]:
        _KERNELS_LOADED[0] = True
        try:
            from quantkit.kernels.registry import register_kernels
        except ImportError:  # a build without the kernels package: the torch reference serves every module
            return KERNELS
        register_kernels(KERNELS)
    return KERNELS


class QuantLinear(nn.Module):
    """A Linear whose weight is stored packed. x: [..., in_features] → [..., out_features]."""

    def __init__(self, in_features: int, out_features: int, spec: WeightSpec,
                 packed: dict[str, torch.Tensor], bias: torch.Tensor | None = None, act: nn.Module | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.fmt = make_format(spec)
        self.act = act
        self.weight_in_features = act.weight_in_features if act is not None else in_features
        self.kernel_key = self.fmt.name if act is None else f"{act.spec.format}:{self.fmt.name}"
        for name, t in packed.items():
            self.register_buffer(name, t)
        self.packed_names = tuple(packed)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._cached: torch.Tensor | None = None  # dequantized weight, only while `cache_weight` is on
        self.cache_weight = False

    @classmethod
    def from_codes(cls, linear: nn.Linear, spec: WeightSpec, codes: torch.Tensor, params,
                   act: nn.Module | None = None) -> QuantLinear:
        """codes/params: the quantized weight (of `act.transform_weight(W)` when `act` is given)."""
        fmt = make_format(spec)
        k = act.weight_in_features if act is not None else linear.in_features
        packed = fmt.pack(codes, params, k)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(linear.in_features, linear.out_features, spec, packed, bias, act)

    def _apply(self, fn, recurse=True):
        """`.to()`, `.cuda()`, `.half()` ... move the packed tensors but never change their storage dtypes
        (a model-wide `.to(torch.bfloat16)` would otherwise turn fp16 scales into bf16 and e4m3 scales into
        bf16, silently changing the stored numbers and what the kernels read)."""
        originals = {n: self._buffers[n] for n in self.packed_names}
        super()._apply(fn, recurse)
        for n, t in originals.items():
            new = self._buffers[n]
            if new.dtype != t.dtype:
                self._buffers[n] = t.to(new.device)
        self._cached = None
        return self

    def packed(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.packed_names}

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the packed tensors represent: [out_features, weight_in_features] in `dtype`."""
        if self._cached is not None and self._cached.dtype == dtype:
            return self._cached
        k = self.weight_in_features
        codes, params = self.fmt.unpack(self.packed(), self.fmt.padded_k(k))
        w = self.fmt.dequantize_grouped(codes, params)[:, :k].to(dtype)
        if self.cache_weight:
            self._cached = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            if not _KERNELS_LOADED[0]:
                load_kernels()
            kernel = KERNELS.get(self.kernel_key)
            if kernel is not None:
                y = kernel(self, x)
                if y is not None:
                    return y
        if self.act is not None:
            x = self.act(x)
        return F.linear(x, self.dequantize_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        s = self.spec
        g = s.group_size or "channel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={s.format}, "
                f"bits={s.bits}, group_size={g}, symmetric={s.symmetric}")

    def scheme_entry(self) -> dict:
        """This module's `quantization_config.modules` entry (weights, activations, shapes)."""
        e = {**self.spec.to_dict(), "in_features": self.in_features, "out_features": self.out_features,
             "bias": self.bias is not None}
        if self.act is not None:
            e["act"] = {**self.act.spec.to_dict(), **self.act.extra_state()}
            e["weight_in_features"] = self.weight_in_features
        return e


def set_weight_cache(model: nn.Module, on: bool) -> None:
    """Keep dequantized weights between forwards (fast CPU evaluation at fp-model memory cost)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.cache_weight = on
            if not on:
                m._cached = None
