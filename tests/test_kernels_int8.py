"""int8-tensor-core W{4,6}A{4,6,8} kernels (kernels/int8_gemm.py) against their torch reference
(kernels/int8_reference.py) and quantkit.formats.act_int.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported) on
small shapes: odd M, K not a multiple of 128, N not a multiple of the block, activation bits 4/6/8 and mixed
per-block bits, channel permutation on and off, INT6 and INT4 (symmetric / asymmetric) weights, per-group and
per-channel weight scales, split-K on and off. With a GPU the same tests run compiled, plus
`test_gpu_real_shapes` at Llama-3-8B shapes through the autotuned entry points.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from quantkit.formats import Int6, UniformInt
from quantkit.formats.act_int import quantize_act_int
from quantkit.kernels import int8_gemm as kg
from quantkit.kernels import int8_reference as ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _weight(bits: int, k: int, n: int, gs: int | None, symmetric: bool = True, seed: int = 0,
            pow2_scales: bool = False, device: str = DEV) -> ref.LowbitWeight:
    """A random LowbitWeight through the real formats' pack (padding codes beyond K stay as packed)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if bits == 6:
        fmt = Int6(6, gs)
        codes, params = fmt.quantize_rtn(w)
    else:
        fmt = UniformInt(4, gs, symmetric)
        codes, params = fmt.quantize_rtn(w)
        if not symmetric:  # spread the zero points over the whole range
            params["zero"] = torch.randint(0, 16, params["zero"].shape, generator=g).float()
    if pow2_scales:
        params["scale"] = 2.0 ** torch.randint(-6, 0, params["scale"].shape, generator=g).float()
    packed = {name: t.to(device) for name, t in fmt.pack(codes, params, k).items()}
    if bits == 6:
        return ref.prepare_int6(packed, k, gs)
    return ref.prepare_int4(packed, k, gs, symmetric)


def _x(m: int, k: int, dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 3] *= 20  # an outlier channel
    return x.to(DEV, dtype)


# ---------------------------------------------------------------- activation quantization


@pytest.mark.parametrize("k", [200, 256, 77])
@pytest.mark.parametrize("bits", [4, 6, 8, "mixed"])
@pytest.mark.parametrize("use_perm", [False, True])
def test_act_quant_bit_exact(k, bits, use_perm):
    groups = -(-k // 128)
    if bits == "mixed":
        b = torch.tensor([8, 4, 6, 8][:groups], dtype=torch.int32, device=DEV)
    else:
        b = bits
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k)).to(DEV, torch.int32) if use_perm else None
    for m, dtype in ((1, torch.bfloat16), (5, torch.float16), (3, torch.float32)):
        x = _x(m, k, dtype, seed=m)
        x[-1, :] = 0  # an all-zero row: scale 1, codes 0
        q, s, qs = kg.quantize_act(x, b, perm)
        xr = x[:, perm.long()] if use_perm else x
        q_ref, s_ref = quantize_act_int(xr, b, 128)
        assert q.shape == (m, groups * 128) and q.dtype == torch.int8
        assert torch.equal(q[:, :k], q_ref) and not q[:, k:].any()
        assert torch.equal(s, s_ref)
        assert torch.equal(qs, q.view(m, groups, 128).sum(-1, dtype=torch.int32))
        q2, s2, qs2 = ref.quantize_act_ref(x, b, perm)
        assert torch.equal(q2, q) and torch.equal(s2, s) and torch.equal(qs2, qs)


@pytest.mark.parametrize("k", [200, 1100, 77])
@pytest.mark.parametrize("bits", [4, 8])
def test_act_quant_per_token_bit_exact(k, bits):
    """Per-token activations: one scale over the whole row (act_int with the group = K), written into every
    128-channel group's scale; codes and group sums as for grouped scales."""
    groups = -(-k // 128)
    for m, dtype in ((1, torch.bfloat16), (5, torch.float16), (3, torch.float32)):
        x = _x(m, k, dtype, seed=m)
        x[0, k // 2] = 40.0  # one outlier sets the whole row's scale
        x[-1, :] = 0  # an all-zero row: scale 1, codes 0
        q, s, qs = kg.quantize_act(x, bits, per_token=True, group_blocks=4)
        q_ref, s_ref = quantize_act_int(x, bits, k)
        assert torch.equal(q[:, :k], q_ref) and not q[:, k:].any()
        assert torch.equal(s, s_ref.expand(m, groups))
        assert torch.equal(qs, q.view(m, groups, 128).sum(-1, dtype=torch.int32))
    with pytest.raises(ValueError, match="per-token"):
        kg.quantize_act(x, torch.tensor([8] * groups, dtype=torch.int32, device=DEV), per_token=True)


def test_act_quant_ties_round_half_to_even():
    # scale = amax/7 = 1 (bits 4): x = j + 0.5 are exact ties; torch.round (and the kernel) go to even
    x = torch.zeros(1, 128)
    x[0, 0] = 7.0
    x[0, 1:14] = torch.arange(-6, 7).float() + 0.5
    x = x.to(DEV, torch.bfloat16)
    q, s, _ = kg.quantize_act(x, 4)
    assert s.item() == 1.0
    assert q[0, 1:14].tolist() == torch.round(torch.arange(-6, 7).float() + 0.5).to(torch.int8).tolist()
    assert torch.equal(q, ref.quantize_act_ref(x, 4)[0])


# ---------------------------------------------------------------- GEMM

WCASES = [  # weight bits, group size, symmetric
    (6, 128, True), (6, None, True), (6, 256, True), (4, 128, False), (4, 128, True), (4, None, False),
]
CONFIGS = {
    "m16": {"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": 1},
    "m16-splitk2": {"BLOCK_M": 16, "BLOCK_N": 64, "SPLIT_K": 2},
    "m16-splitk3": {"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": 3},
    "m32-grouped": {"BLOCK_M": 32, "BLOCK_N": 32, "SPLIT_K": 1, "GROUP_M": 2},
}
PREFILL_CONFIGS = {  # kernels/int8_prefill.py (path="prefill")
    "prefill": {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    "prefill-grouped": {"BLOCK_M": 16, "BLOCK_N": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 1},
}
GEMV_CONFIGS = {  # the dp4a decode kernel (path="gemv", M <= 16)
    "gemv": {"BLOCK_N": 32, "SPLIT_K": 1},
    "gemv-splitk3": {"BLOCK_N": 64, "SPLIT_K": 3},
}


def _wid(c):
    return f"w{c[0]}-g{c[1] or 'ch'}{'-sym' if c[2] else '-asym'}"


@pytest.mark.parametrize("wcase", WCASES, ids=_wid)
def test_gemm_integer_part_exact(wcase):
    """Power-of-two scales and fp32 output: every product and sum is exact, so the kernel must equal the
    reference bit for bit (this pins the integer dots, the zero-point removal and the group indexing)."""
    bits, gs, sym = wcase
    k, n = 300, 72  # K: 3 blocks, the last short; N not a multiple of the block
    w = _weight(bits, k, n, gs, sym, seed=bits, pow2_scales=True)
    g = torch.Generator().manual_seed(2)
    for m in (1, 7, 33):
        qa = torch.zeros(m, w.blocks * 128, dtype=torch.int8)
        qa[:, :k] = torch.randint(-127, 128, (m, k), generator=g).to(torch.int8)
        qa = qa.to(DEV)
        a_s = (2.0 ** torch.randint(-8, -2, (m, w.blocks), generator=g).float()).to(DEV)
        a_sum = qa.view(m, w.blocks, 128).sum(-1, dtype=torch.int32)
        y_ref = ref.lowbit_gemm_ref(qa, a_s, w, dtype=torch.float64)
        for name, cfg in CONFIGS.items():
            if name.startswith("m16") and m > 16:
                continue
            y = kg.lowbit_gemm(qa, a_s, a_sum, w, out_dtype=torch.float32, config=cfg)
            assert torch.equal(y.double(), y_ref), (name, m, (y.double() - y_ref).abs().max().item())
        for name, cfg in GEMV_CONFIGS.items():
            if m > 16:
                continue
            y = kg.lowbit_gemm(qa, a_s, a_sum, w, out_dtype=torch.float32, config=cfg, path="gemv")
            assert torch.equal(y.double(), y_ref), (name, m, (y.double() - y_ref).abs().max().item())
        for name, cfg in PREFILL_CONFIGS.items():  # the large-M path: int8 workspace + block-scaled GEMM
            y = kg.lowbit_gemm(qa, a_s, a_sum, w, out_dtype=torch.float32, config=cfg, path="prefill")
            assert torch.equal(y.double(), y_ref), (name, m, (y.double() - y_ref).abs().max().item())


@pytest.mark.parametrize("wcase", WCASES, ids=_wid)
def test_linear_matches_reference(wcase):
    bits, gs, sym = wcase
    k, n = 200, 40
    w = _weight(bits, k, n, gs, sym, seed=3)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(4)).to(DEV, torch.bfloat16)
    groups = -(-k // 128)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(5)).to(DEV, torch.int32)
    act = [(8, None), (6, None), (torch.tensor([8, 4], dtype=torch.int32, device=DEV)[:groups], perm)]
    for (abits, p), (m, dtype) in zip(act, ((1, torch.bfloat16), (5, torch.float16), (17, torch.bfloat16)),
                                      strict=True):
        x = _x(m, k, dtype, seed=m)
        qa, s, qs = kg.quantize_act(x, abits, p)
        y_ref = ref.lowbit_linear_ref(x, w, abits, p, bias, dtype=torch.float64)
        cfg = CONFIGS["m16-splitk2"] if m <= 16 else CONFIGS["m32-grouped"]
        y = kg.lowbit_gemm(qa, s, qs, w, bias, out_dtype=dtype, config=cfg)
        assert y.dtype == dtype and y.shape == (m, n)
        err = ((y.double() - y_ref).norm() / y_ref.norm()).item()
        assert err < 1e-2, (m, err)  # bf16/fp16 output rounding
        if m <= 16:  # the dp4a GEMV: same integer sums and epilogue
            yg = kg.lowbit_gemm(qa, s, qs, w, bias, out_dtype=dtype, config=GEMV_CONFIGS["gemv-splitk3"],
                                path="gemv")
            assert ((yg.double() - y_ref).norm() / y_ref.norm()).item() < 1e-2, m
        yp = kg.lowbit_gemm(qa, s, qs, w, bias, out_dtype=dtype, config=PREFILL_CONFIGS["prefill"], path="prefill")
        assert yp.dtype == dtype and ((yp.double() - y_ref).norm() / y_ref.norm()).item() < 1e-2, m
        # the fake-quant float path (act_int dequantize @ dequantized weight) agrees too
        xq = ref.quantize_act_ref(x, abits, p)
        xf = (xq[0].view(m, groups, 128).double() * xq[1].double().unsqueeze(-1)).view(m, -1)[:, :k]
        y_fq = xf @ ref.dequantize(w).double().t() + bias.double()
        assert ((y_ref - y_fq).norm() / y_fq.norm()).item() < 1e-6


@pytest.mark.parametrize("wcase", [(4, 128, False), (6, None, True)], ids=_wid)
def test_linear_per_token_matches_fake_quant(wcase):
    """`lowbit_linear(per_token=True)` = the torch reference QuantLinear runs for per-token activations
    (fake-quantized x with one scale per token @ the dequantized weight)."""
    from quantkit.formats.act_int import fake_quant_act_int

    bits, gs, sym = wcase
    k, n = 300, 40
    w = _weight(bits, k, n, gs, sym, seed=7)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(8)).to(DEV, torch.bfloat16)
    for m in (1, 9):
        x = _x(m, k, torch.bfloat16, seed=m)
        y_ref = fake_quant_act_int(x.double(), 8, k) @ ref.dequantize(w).double().t() + bias.double()
        qa, s, qs = kg.quantize_act(x, 8, per_token=True)
        ys = [kg.lowbit_gemm(qa, s, qs, w, bias, out_dtype=torch.bfloat16, config=CONFIGS["m16-splitk2"]),
              kg.lowbit_gemm(qa, s, qs, w, bias, out_dtype=torch.bfloat16, config=PREFILL_CONFIGS["prefill"],
                             path="prefill"),
              kg.lowbit_gemm(qa, s, qs, w, bias, out_dtype=torch.bfloat16, config=PREFILL_CONFIGS["prefill"],
                             path="prefill", per_token=True)]
        if DEV == "cuda":  # the autotuned entry point (the interpreter cannot autotune)
            ys.append(kg.lowbit_linear(x, w, 8, None, bias, per_token=True))
        for y in ys:
            assert y.dtype == torch.bfloat16 and ((y.double() - y_ref).norm() / y_ref.norm()).item() < 1e-2, m


def test_split_k_is_deterministic_and_resets_counters():
    w = _weight(6, 384, 48, 128)
    x = _x(3, 384, torch.bfloat16)
    qa, s, qs = kg.quantize_act(x, 6)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": 3}
    y1 = kg.lowbit_gemm(qa, s, qs, w, out_dtype=torch.float32, config=cfg)
    y2 = kg.lowbit_gemm(qa, s, qs, w, out_dtype=torch.float32, config=cfg)
    assert torch.equal(y1, y2)
    assert not kg._COUNTERS[qa.device].any()
    g1 = kg.lowbit_gemm(qa, s, qs, w, out_dtype=torch.float32, config=GEMV_CONFIGS["gemv-splitk3"], path="gemv")
    g2 = kg.lowbit_gemm(qa, s, qs, w, out_dtype=torch.float32, config=GEMV_CONFIGS["gemv-splitk3"], path="gemv")
    assert torch.equal(g1, g2) and torch.equal(g1, y1)  # exact integer sums, same epilogue order per split
    assert not kg._COUNTERS[qa.device].any()
    with pytest.raises(ValueError, match="M <= 16"):
        kg.lowbit_gemm(*kg.quantize_act(_x(17, 384, torch.bfloat16), 6), w, path="gemv")


@pytest.mark.parametrize("wcase", WCASES, ids=_wid)
def test_prefill_unpack_is_signed_codes(wcase):
    """The prefill path's workspace holds the signed codes c − z per (column, K) as int8 (padding included),
    and a smaller Linear after a larger one reuses the grown workspace."""
    from quantkit.kernels import int8_prefill as kp

    bits, gs, sym = wcase
    w = _weight(bits, 300, 40, gs, sym, seed=7)
    c = ref.weight_codes(w)  # [N, Kp]
    z = ref.weight_zeros(w)  # [groups, N]
    wgs = (gs // 128) if gs else w.blocks
    zz = z[torch.arange(w.blocks, device=c.device) // wgs].t().repeat_interleave(128, dim=1)
    assert torch.equal(kp.unpack_weight(w).long(), c - zz)
    big = _weight(bits, 600, 64, gs, sym, seed=8)
    qa, s, qs = kg.quantize_act(_x(3, 600, torch.float32), 8)
    kg.lowbit_gemm(qa, s, qs, big, out_dtype=torch.float32, config=PREFILL_CONFIGS["prefill"], path="prefill")
    n_ws = kp._WORKSPACE[qa.device].numel()
    qa, s, qs = kg.quantize_act(_x(3, 300, torch.float32), 8)
    y = kg.lowbit_gemm(qa, s, qs, w, out_dtype=torch.float32, config=PREFILL_CONFIGS["prefill"], path="prefill")
    assert kp._WORKSPACE[qa.device].numel() == n_ws >= 64 * 640
    y_ref = ref.lowbit_gemm_ref(qa, s, w)
    assert ((y.double() - y_ref).norm() / y_ref.norm()).item() < 1e-6
    with pytest.raises(ValueError, match="unknown path"):
        kg.lowbit_gemm(qa, s, qs, w, path="dense")


@pytest.mark.parametrize("wcase", WCASES, ids=_wid)
def test_prefill_tma_kernel_matches_pointer_kernel(wcase):
    """The TMA GEMM (in-kernel tensor descriptors; the compiled default on Hopper) reads the same blocks in the
    same order as the pointer GEMM: bit-identical, also where M and N end inside a tile (TMA zero-fills)."""
    from quantkit.kernels import int8_prefill as kp

    bits, gs, sym = wcase
    w = _weight(bits, 300, 40, gs, sym, seed=11)
    bias = torch.randn(40, generator=torch.Generator().manual_seed(3)).to(DEV)
    wt = kp.unpack_weight(w)
    for m in (5, 21):
        qa, s, _ = kg.quantize_act(_x(m, 300, torch.float32), 6)
        for cfg in PREFILL_CONFIGS.values():
            y0 = kp.prefill_gemm(qa, s, wt, w, bias=bias, out_dtype=torch.float32, config=cfg, tma=False)
            y1 = kp.prefill_gemm(qa, s, wt, w, bias=bias, out_dtype=torch.float32, config=cfg, tma=True)
            assert torch.equal(y0, y1)
    assert (y1.double() - ref.lowbit_gemm_ref(qa, s, w, bias=bias)).abs().max() < 1e-4


@pytest.mark.parametrize("wcase", [(6, None, True), (4, None, False), (6, 128, True)], ids=_wid)
def test_prefill_per_token_plain_form_exact(wcase):
    """Per-token activations × per-channel weight scales: the prefill GEMM accumulates the int8 dots in int32
    over all of K and scales once (PLAIN). With power-of-two scales and fp32 output every step is exact, so both
    the pointer and the TMA kernel equal the reference bit for bit, and equal the block-scaled form. Grouped
    weights (g128) keep the block-scaled form whatever `per_token` says."""
    from quantkit.kernels import int8_prefill as kp

    bits, gs, sym = wcase
    k, n = 300, 40
    w = _weight(bits, k, n, gs, sym, seed=13, pow2_scales=True)
    wt = kp.unpack_weight(w)
    g = torch.Generator().manual_seed(6)
    for m in (3, 21):
        qa = torch.zeros(m, w.blocks * 128, dtype=torch.int8)
        qa[:, :k] = torch.randint(-127, 128, (m, k), generator=g).to(torch.int8)
        qa = qa.to(DEV)
        a_s = (2.0 ** torch.randint(-8, -2, (m, 1), generator=g).float()).expand(m, w.blocks).contiguous().to(DEV)
        y_ref = ref.lowbit_gemm_ref(qa, a_s, w, dtype=torch.float64)
        for cfg in PREFILL_CONFIGS.values():
            for tma in (False, True):
                y = kp.prefill_gemm(qa, a_s, wt, w, out_dtype=torch.float32, config=cfg, tma=tma, per_token=True)
                assert torch.equal(y.double(), y_ref), (cfg, tma, m, (y.double() - y_ref).abs().max().item())
                yb = kp.prefill_gemm(qa, a_s, wt, w, out_dtype=torch.float32, config=cfg, tma=tma)
                assert torch.equal(y, yb)


def test_prepare_and_supports():
    k, n = 200, 24
    fmt = UniformInt(4, 128, False)
    codes, params = fmt.quantize_rtn(torch.randn(n, k, generator=torch.Generator().manual_seed(0)))
    packed = fmt.pack(codes, params, k)
    w4 = ref.prepare_int4(packed, k, 128, symmetric=False)
    assert torch.equal(ref.dequantize(w4), fmt.dequantize_grouped(codes, params))
    f6 = Int6(6, 128)
    c6, p6 = f6.quantize_rtn(torch.randn(n, k))
    w6 = ref.prepare_int6(f6.pack(c6, p6, k), k, 128)
    assert torch.equal(ref.dequantize(w6), f6.dequantize_grouped(c6, p6))
    assert kg.supports("int6", 6, 128) and kg.supports("int", 4, None) and not kg.supports("int", 4, 64)
    assert not kg.supports("int", 3, 128) and not kg.supports("hlq", 4, 128)
    with pytest.raises(ValueError):
        ref.prepare_int6(f6.pack(c6, p6, k), k, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("case", [(6, 128, True, "a8"), (4, 128, False, "comet"), (4, 128, True, "a6")], ids=str)
def test_gpu_real_shapes(case):
    """Autotuned kernels (every M path) at a Llama-3-8B shape vs the float64 reference."""
    bits, gs, sym, act = case
    k, n = 4096, 14336
    w = _weight(bits, k, n, gs, sym, device="cuda")
    abits, perm = {"a8": (8, None), "a6": (6, None)}.get(act, (None, None))
    if act == "comet":
        abits = torch.full((k // 128,), 4, dtype=torch.int32, device="cuda")
        abits[::5] = 8
        perm = torch.randperm(k, device="cuda").to(torch.int32)
    for m in (1, 4, 16, 255, 1024):  # 255: the tensor-core kernel; 1024: the prefill path
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        y = kg.lowbit_linear(x, w, abits, perm)
        y_ref = ref.lowbit_linear_ref(x, w, abits, perm, dtype=torch.float64)
        bf16 = ((y_ref.to(torch.bfloat16).double() - y_ref).norm() / y_ref.norm()).item()
        err = ((y.double() - y_ref).norm() / y_ref.norm()).item()
        assert err < 2 * bf16 + 1e-4, (m, err, bf16)
