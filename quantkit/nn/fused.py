"""Inference-time fusion of Linears that read the same input: q/k/v, gate/up.

At decode time (one token) each projection is a GEMV whose fixed cost — launch, ramp-up, the split-K
reduction — is a large part of its time on the small shapes (k_proj / v_proj of Llama-3-8B are 4096 × 1024:
5.5 µs for 0.5 µs of int4 weights, docs/results/kernels_h200.json). One Linear over the concatenated output
features reads the same bytes in one launch. The model code is left untouched: each original projection is
replaced by a `LinearSlice` that asks the shared `FusedLinear` for its columns; the first slice called with
an input computes the whole product, the others take views of it.

Packed weights are concatenated through their format's unpack / pack (codes and per-group parameters are
per output feature), so any weight-only format fuses. Linears with an activation quantizer fuse when their
quantizers are identical (same spec and buffers: the pipeline calibrates q/k/v and gate/up on one shared
input, so COMET's permutation and FlexQ's bits agree unless the A8 search split them) and the weight format
can hold the members in one matrix (NVFP4's single fp32 tensor scale per matrix cannot, so ARC stays unfused):
the input is then quantized once for the group.

This is a runtime transform, like the kernels' repack: a fused model's state dict has the fused names, so
save the unfused model (`quantkit.save` before fusing).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from quantkit.adapters import GENERIC, adapter_for
from quantkit.errors import QuantkitError
from quantkit.nn.quant_linear import QuantLinear

# Projections that read one input in Llama-style decoder layers (Llama, Mistral, Qwen2/3, Gemma 3, SmolLM):
# each tuple is fused when all its members are present and compatible. A model's own groups come from its
# adapter (`quantkit.adapters.ModelAdapter.fusable_groups`: none on Phi-3, whose checkpoint stores them fused).
SHARED_INPUT_GROUPS: tuple[tuple[str, ...], ...] = GENERIC.fusable_groups


class FusedLinear(nn.Module):
    """One Linear over the concatenated outputs of several; `output(i, x)` gives member i's columns.

    The product is computed once per input: a call with the same tensor (same object, not modified in place)
    as the pending one returns a view, any other input recomputes. Once every member has taken its columns
    the cached input and output are dropped, so nothing outlives the layer's forward.
    """

    def __init__(self, linear: nn.Module, sizes: list[int]):
        super().__init__()
        self.linear = linear
        self.sizes = list(sizes)
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes) + 1)]
        self._x: torch.Tensor | None = None
        self._x_version = -1
        self._y: torch.Tensor | None = None
        self._pending: set[int] = set()

    def output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        # Traced by torch.compile as well: the checks then run at trace time (dynamo guards on the
        # aliasing of its inputs), and the graph holds one product per group. The in-place check is
        # eager-only (a traced frame sees no in-place change between the members' calls).
        compiling = torch.compiler.is_compiling()
        stale = self._y is None or self._x is not x or i not in self._pending
        if not stale and not compiling:
            stale = x._version != self._x_version
        if stale:
            self._y = self.linear(x)
            self._x = x
            if not compiling:
                self._x_version = x._version
            self._pending = set(range(len(self.sizes)))
        y = self._y[..., self.offsets[i]:self.offsets[i + 1]]
        self._pending.discard(i)
        if not self._pending:
            self._x = self._y = None
        return y

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


class LinearSlice(nn.Module):
    """Stands in for one fused projection: its output features of the shared `FusedLinear`."""

    def __init__(self, group: FusedLinear, index: int, in_features: int):
        super().__init__()
        # a plain attribute list keeps the shared module out of this module's children (and state dict)
        self._group = [group]
        self.index = index
        self.in_features = in_features
        self.out_features = group.sizes[index]

    @property
    def group(self) -> FusedLinear:
        return self._group[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(self.index, x)

    def extra_repr(self) -> str:
        return f"index={self.index}, in_features={self.in_features}, out_features={self.out_features}"


def _fusable(mods: list[nn.Module]) -> bool:
    first = mods[0]
    if any(m.in_features != first.in_features or (m.bias is None) != (first.bias is None) for m in mods):
        return False
    if all(type(m) is nn.Linear for m in mods):
        return all(m.weight.dtype == first.weight.dtype and m.weight.device == first.weight.device for m in mods)
    if all(isinstance(m, QuantLinear) for m in mods):
        return all(m.spec == first.spec and _same_act(m.act, first.act) for m in mods)
    return False


def _same_act(a: nn.Module | None, b: nn.Module | None) -> bool:
    if a is None or b is None:
        return a is b
    if type(a) is not type(b) or a.spec != b.spec or a.weight_in_features != b.weight_in_features:
        return False
    sa, sb = dict(a.named_buffers()), dict(b.named_buffers())
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k].to(sb[k].device), sb[k]) for k in sa)


@torch.no_grad()
def concat_linears(mods: list[nn.Module]) -> nn.Module:
    """One Linear (or QuantLinear, same format) whose output features are `mods`' in order."""
    first = mods[0]
    bias = torch.cat([m.bias for m in mods]) if first.bias is not None else None
    n = sum(m.out_features for m in mods)
    if isinstance(first, QuantLinear):
        fmt, k = first.fmt, first.weight_in_features
        parts = [fmt.unpack(m.packed(), fmt.padded_k(k)) for m in mods]
        codes = torch.cat([c for c, _ in parts])
        params = {name: torch.cat([p[name] for _, p in parts]) for name in parts[0][1]}
        packed = fmt.pack(codes, params, k)  # QuantkitError where the format cannot hold them in one matrix
        act = copy.deepcopy(first.act) if first.act is not None else None
        return QuantLinear(first.in_features, n, first.spec, packed, bias.clone() if bias is not None else None,
                           act)
    lin = nn.Linear(first.in_features, n, bias=bias is not None, device=first.weight.device,
                    dtype=first.weight.dtype)
    lin.weight.copy_(torch.cat([m.weight for m in mods]))
    if bias is not None:
        lin.bias.copy_(bias)
    return lin


def fuse_shared_input_linears(model: nn.Module, groups: tuple[tuple[str, ...], ...] | None = None) -> list[str]:
    """Replace every compatible group of sibling projections (`groups`; default: the model's adapter's
    `fusable_groups`, `SHARED_INPUT_GROUPS` for a module without an HF config) by slices of one fused Linear,
    in place. On an HF model only its decoder layers are searched (not, e.g., a vision tower's attention).
    Returns the fused groups as "<parent>.{a,b,c}". Idempotent: slices are not fused again."""
    scope = ""
    if hasattr(model, "config"):
        adapter = adapter_for(model, check=False)
        groups = adapter.fusable_groups if groups is None else groups
        scope = f"{adapter.layers_path}." if adapter.missing(model) is None else ""
    groups = SHARED_INPUT_GROUPS if groups is None else groups
    fused = []
    for parent_name, parent in list(model.named_modules()):
        if not parent_name.startswith(scope):
            continue
        for names in groups:
            mods = [getattr(parent, n, None) for n in names]
            if any(m is None or isinstance(m, LinearSlice) for m in mods) or not _fusable(mods):
                continue
            try:
                linear = concat_linears(mods)
            except QuantkitError:  # e.g. NVFP4 members with different tensor scales
                continue
            group = FusedLinear(linear, [m.out_features for m in mods])
            for i, name in enumerate(names):
                setattr(parent, name, LinearSlice(group, i, mods[i].in_features))
            # registered once on the parent, so `.to()` / `.cuda()` and named_modules() reach it
            parent.add_module("fused_" + "_".join(n.split("_")[0] for n in names), group)
            fused.append(f"{parent_name}.{{{','.join(names)}}}")
    return fused


__all__ = ["SHARED_INPUT_GROUPS", "FusedLinear", "LinearSlice", "concat_linears", "fuse_shared_input_linears"]
