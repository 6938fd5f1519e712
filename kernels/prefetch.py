"""Prefill-size weight-only products with the dequantization off the critical path.

From M = `dispatch.dequant_min_m` on, a weight-only product is "dequantize into a bf16/fp16 workspace, then
cuBLAS" (dispatch.py). The dequantization is a memory-bound write of 2 bytes per weight, a fixed cost per
forward that does not shrink with the prompt (for a Llama-3-8B shape about 6 ms per prefill on an H100).

`install(model)` gives the model's weight-only QuantLinears (the output embedding left out) a
`WorkspacePrefetch`: Linear i's product reads its weight from one of two persistent slots and enqueues, on a
side stream, the dequantization of the Linear that ran after it last time into the other slot, so that it runs
next to Linear i's GEMM and the attention / norm kernels between the two. The order is learned, not assumed
(module registration order is not execution order: fused q/k/v modules are registered after o_proj): the
first forward after `install` records which Linear follows which and prefetches nothing. Ordering is by CUDA
events:
- the side stream writes a slot only after the main stream has enqueued everything up to Linear i, so the
  last reader of that slot (Linear i-1's GEMM) comes first;
- the main stream reads a slot only after the event of its write;
- every prefetch is waited on by the next product that runs, whichever Linear that is, so no side-stream work
  is left unjoined (CUDA-graph capture requires that). When the Linear that runs is not the one prefetched
  (another module order, a different M) it dequantizes its own weight: slower, never wrong.
Nothing is prefetched for the Linear that ran first after `install` (the start of a forward), so no side-stream
work crosses from one forward (or CUDA graph) into the next.

Costs two slots of the largest weight in the activation dtype (Llama-3-8B with fused gate/up: 2 x 235 MB).
`uninstall(model)` removes it. Reference semantics are `dispatch.dequant_matmul`'s: the same dequantization
kernel and the same cuBLAS product, only on other streams.
"""

from __future__ import annotations

import torch

from quantkit.kernels import dispatch

_PLANS: dict[int, tuple[WorkspacePrefetch, int]] = {}  # q0.data_ptr() -> (plan, index in its order)


class WorkspacePrefetch:
    """Two workspace slots, a side stream and the order of the Linears that share them (module docstring)."""

    def __init__(self, members: list[dispatch.Prepared], device: torch.device):
        self.members = members
        self.numel = max(p.k * p.n for p in members)
        self.device = device
        self.side = torch.cuda.Stream(device)
        self.slots: dict[torch.dtype, list[torch.Tensor]] = {}
        self.pending: tuple | None = None  # (index, slot, event, dtype)
        self.last_slot = 1
        self.first: int | None = None  # the Linear a forward starts with (the first seen)
        self.prev: int | None = None
        self.next: dict[int, int] = {}  # learned: index -> the index that ran after it
        self.hits = 0
        self.misses = 0

    def _slots(self, dtype: torch.dtype) -> list[torch.Tensor]:
        if dtype not in self.slots:
            self.slots[dtype] = [torch.empty(self.numel, dtype=dtype, device=self.device) for _ in range(2)]
        return self.slots[dtype]

    def matmul(self, i: int, p: dispatch.Prepared, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        main = torch.cuda.current_stream(x.device)
        slots = self._slots(x.dtype)
        pend, self.pending = self.pending, None
        if pend is not None:
            main.wait_event(pend[2])  # joined whether or not it is this Linear's weight
        if pend is not None and pend[0] == i and pend[3] == x.dtype:
            s = pend[1]
            self.hits += 1
        else:
            s = 1 - self.last_slot
            dispatch.dequant(p, x.dtype, x.device, out=slots[s][: p.k * p.n].view(p.k, p.n))
            self.misses += 1
        self.last_slot = s
        if self.first is None:
            self.first = i
        if self.prev is not None:
            self.next[self.prev] = i
        self.prev = i
        j = self.next.get(i)
        if j is not None and j != self.first and dispatch.choose_path(self.members[j], x.shape[0]) == "dequant":
            q = self.members[j]
            ready = torch.cuda.Event()
            ready.record(main)  # after Linear i-1's GEMM, the last reader of slot 1 - s
            self.side.wait_event(ready)
            with torch.cuda.stream(self.side):
                dispatch.dequant(q, x.dtype, x.device, out=slots[1 - s][: q.k * q.n].view(q.k, q.n))
                done = torch.cuda.Event()
                done.record(self.side)
            self.pending = (j, 1 - s, done, x.dtype)
        wt = slots[s][: p.k * p.n].view(p.k, p.n)
        return torch.addmm(bias.to(x.dtype), x, wt) if bias is not None else x @ wt


def lookup(p: dispatch.Prepared) -> tuple[WorkspacePrefetch, int] | None:
    return _PLANS.get(p.q0.data_ptr()) if _PLANS else None


def install(model: torch.nn.Module) -> WorkspacePrefetch | None:
    """Prefetch the workspace of `model`'s weight-only QuantLinears on CUDA (the output embedding excluded;
    their order is learned by the first forward). Returns the plan, or None with fewer than two such Linears."""
    from quantkit.nn.quant_linear import QuantLinear

    uninstall(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    members = []
    for m in model.modules():
        if not isinstance(m, QuantLinear) or m is head or m.act is not None or not m.qweight.is_cuda:
            continue
        p = dispatch.prepared_for(m)
        if p is None:
            continue
        members.append(p)
    if len(members) < 2:
        return None
    plan = WorkspacePrefetch(members, members[0].q0.device)
    for i, p in enumerate(members):
        _PLANS[p.q0.data_ptr()] = (plan, i)
    model._workspace_prefetch = plan
    return plan


def uninstall(model: torch.nn.Module) -> None:
    plan = getattr(model, "_workspace_prefetch", None)
    if plan is None:
        return
    for p in plan.members:
        _PLANS.pop(p.q0.data_ptr(), None)
    del model._workspace_prefetch
