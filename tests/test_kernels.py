"""Triton weight-only GEMM kernels (kernels/wq_gemm.py) against their torch reference (kernels/reference.py).

Without a GPU every kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set here before triton is
imported) on small shapes: odd M, N not a multiple of the block, K not a multiple of the group, group sizes
32/64/128 and per-channel, bits 2/3/4, both formats, split-K on and off, bias. With a GPU the same tests run
compiled, plus `test_gpu_real_shapes` at Llama-3-8B shapes through the QuantLinear dispatch (autotuned),
checked against a float64 reference.
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

from quantkit.formats.packing import pack_codes
from quantkit.kernels import dispatch
from quantkit.kernels.reference import dequantize, wq_matmul_ref
from quantkit.nn import QuantLinear
from quantkit.recipe import WeightSpec

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def random_packed(fmt: str, bits: int, gs: int | None, k: int, n: int, symmetric: bool = False,
                  seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random stored tensors of a QuantLinear (padding codes beyond K are random too: they must not count)."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // (gs or k))
    kp = groups * (gs or k)
    codes = torch.randint(0, 1 << bits, (n, kp), generator=g)
    out = {"qweight": pack_codes(codes, bits)}
    if fmt == "int":
        out["scales"] = (torch.rand(groups, n, generator=g) * 0.02 + 0.001).half()
        if not symmetric:
            out["zeros"] = torch.randint(0, 1 << bits, (groups, n), generator=g).to(torch.uint8)
    else:
        out["scales"] = (torch.randn(groups, bits, n, generator=g) * 0.02).half()
        out["offsets"] = (torch.randn(groups, n, generator=g) * 0.02).half()
    return {name: t.to(device) for name, t in out.items()}


def _ref(p: dict, fmt, bits, gs, k, x, bias=None, dtype=torch.float32):
    return wq_matmul_ref(x, fmt, bits, gs, k, p["qweight"], p["scales"], p.get("zeros"), p.get("offsets"),
                         bias, dtype=dtype)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


CASES = [  # fmt, bits, group size, symmetric
    ("int", 4, 128, False), ("int", 4, None, True), ("int", 3, 64, False), ("int", 2, 32, False),
    ("int", 3, None, False), ("hlq", 4, 64, False), ("hlq", 3, 128, False), ("hlq", 2, 32, False),
    ("hlq", 2, None, False),
]


def _ids(c):
    return f"{c[0]}{c[1]}-g{c[2] or 'ch'}{'-sym' if c[3] else ''}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernels_match_reference(case):
    fmt, bits, gs, sym = case
    k, n = 136, 72  # K not a multiple of 32 or of the group (a ragged last group); N not a multiple of the block
    p = random_packed(fmt, bits, gs, k, n, sym, seed=bits, device=DEV)
    prep = dispatch.prepare(fmt, bits, gs, k, n, p)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(n, generator=g).to(DEV, torch.bfloat16)
    for m, dtype in ((1, torch.bfloat16), (3, torch.float16), (17, torch.bfloat16)):  # odd M, both dtypes
        x = torch.randn(m, k, generator=g).to(DEV, dtype)
        ref = _ref(p, fmt, bits, gs, k, x, bias)
        bk = 32 if gs in (32, None) else 64
        runs = {
            "gemm": dispatch.gemm(prep, x, bias, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": bk, "SPLIT_K": 1}),
            "gemm-splitk": dispatch.gemm(prep, x, bias, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 2}),
            "gemm-swap": dispatch.gemm(prep, x, bias, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": bk, "SPLIT_K": 1,
                                                       "SWAP": True}),
            "dequant": dispatch.dequant_matmul(prep, x, bias),
        }
        # the decode paths, one program per row (the interpreter's slowest part): the fp32 GEMV at M = 1,
        # the half2 GEMV (the default decode kernel) at M = 1 and 3
        if m == 1:
            runs["gemv"] = dispatch.gemv(prep, x, bias, {"BLOCK_N": 32, "RUNS": bk // 32, "SPLIT_K": 1, "num_warps": 2})
            runs["gemv-splitk"] = dispatch.gemv(prep, x, bias, {"BLOCK_N": 64, "RUNS": 1, "SPLIT_K": 3,
                                                                    "num_warps": 2})
        if m <= 3:
            runs["gemv-h2"] = dispatch.gemv_h2(prep, x, bias, {"BLOCK_N": 32, "SPLIT_K": 1, "num_warps": 2})
            runs["gemv-h2-splitk"] = dispatch.gemv_h2(prep, x, bias, {"BLOCK_N": 64, "SPLIT_K": 3, "num_warps": 1})
        for name, y in runs.items():
            assert y.shape == (m, n) and y.dtype == dtype
            err = _rel(y, ref)
            assert err < 1e-2, (name, m, err)  # bf16/fp16 output rounding is ~4e-3
        # split-K leaves its workspace zeroed and counters reset: a second call gives the same answer
        again = dispatch.gemm(prep, x, bias, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 2})
        assert torch.equal(again, runs["gemm-splitk"])


def test_dequant_kernel_exact():
    """The fp32 dequantized tile equals the reference weight to fp32 rounding (fields are exact)."""
    for fmt, bits, gs in (("int", 3, 64), ("hlq", 4, 32), ("int", 4, None)):
        k, n = 96, 40
        p = random_packed(fmt, bits, gs, k, n, device=DEV)
        prep = dispatch.prepare(fmt, bits, gs, k, n, p)
        wt = dispatch.dequant(prep, torch.float32, block_n=32, block_k=32)
        ref = dequantize(fmt, bits, gs, k, p["qweight"], p["scales"], p.get("zeros"), p.get("offsets"))
        torch.testing.assert_close(wt.t(), ref, rtol=1e-6, atol=1e-6)


def test_dequant_workspace_layouts_and_paths_agree():
    """The [N, K] workspace is the [K, N] one transposed, bit for bit, and both workspace paths give the
    product of the reference weight (any format, bits, group size)."""
    for fmt, bits, gs in (("int", 4, 64), ("hlq", 2, 32), ("int", 3, None)):
        k, n, m = 96, 40, 5
        p = random_packed(fmt, bits, gs, k, n, device=DEV)
        prep = dispatch.prepare(fmt, bits, gs, k, n, p)
        kn = dispatch.dequant(prep, torch.float32, block_n=32, block_k=32)
        nk = dispatch.dequant(prep, torch.float32, block_n=32, block_k=32, nk=True)
        assert nk.shape == (n, k) and torch.equal(nk, kn.t())
        x = torch.randn(m, k, device=DEV)
        ref = x.double() @ dequantize(fmt, bits, gs, k, p["qweight"], p["scales"], p.get("zeros"),
                                      p.get("offsets")).double().t()
        for path in ("dequant_kn", "dequant_nk"):
            assert _rel(dispatch.matmul(prep, x, None, path), ref) < 1e-4, path


def test_choose_path_by_rows_and_format():
    """Decode M goes to the GEMV, small M to the fused GEMM, large M to the workspace; int4 keeps the fused
    GEMM up to its own measured threshold, other formats switch at the default one."""
    mk = lambda fmt, bits: dispatch.Prepared(dispatch._FMT_CODE[fmt], bits, 128, 4096, 4096, *([None] * 5))
    i4, h2, i3 = mk("int", 4), mk("hlq", 2), mk("int", 3)
    assert [dispatch.choose_path(i4, m) for m in (1, 2, 3, 128, 255, 256, 2048)] == \
        ["gemv", "gemv", "gemm", "gemm", "gemm", "dequant", "dequant"]
    for p in (h2, i3):
        lo = dispatch.DEQUANT_MIN_M
        assert [dispatch.choose_path(p, m) for m in (2, 3, lo - 1, lo)] == ["gemv", "gemm", "gemm", "dequant"]
    assert dispatch.dequant_min_m(i4) > dispatch.DEQUANT_MIN_M


def test_large_m_gemm_configs_run_in_interpreter_or_gpu():
    """Every autotuner config for M > 64 computes the product (explicit launch, small shape)."""
    from quantkit.kernels import wq_gemm

    k, n, m = 256, 96, 40
    p = random_packed("int", 4, 128, k, n, device=DEV)
    prep = dispatch.prepare("int", 4, 128, k, n, p)
    x = torch.randn(m, k, device=DEV, dtype=torch.float32 if DEV == "cpu" else torch.bfloat16)
    ref = x.double() @ dequantize("int", 4, 128, k, p["qweight"], p["scales"], p.get("zeros"), None).double().t()
    for c in wq_gemm.GEMM_LARGE_CONFIGS[-1:]:  # the M = 128 config (SWAP)
        cfg = {**c.kwargs, "SPLIT_K": 1}
        cfg.pop("PPS", None)
        assert _rel(dispatch.gemm(prep, x, None, cfg), ref) < (1e-5 if DEV == "cpu" else 1e-2)


def test_dispatch_registration_and_fallback():
    from quantkit.nn.quant_linear import load_kernels

    assert dispatch.supports("int", 3, None) and not dispatch.supports("hlq", 4, 16)
    kernels = load_kernels()  # the registration hook (lazy: quantkit.nn does not import the kernels)
    assert ("int" in kernels) == torch.cuda.is_available()
    k, n = 64, 48
    p = random_packed("int", 4, 32, k, n)
    mod = QuantLinear(k, n, WeightSpec(format="int", bits=4, group_size=32), p)
    assert dispatch.quant_linear_forward(mod, torch.randn(2, k)) is None  # CPU input: torch reference


def test_wq_matmul_op_matches_dispatch_and_passes_opcheck(monkeypatch):
    """The custom op torch.compile traces into computes what the direct call does, and its fake (meta)
    implementation agrees with it (torch.library.opcheck: schema, fake tensor, AOT dispatch)."""
    if DEV == "cpu":  # the interpreter cannot autotune: a fixed GEMV config behind `matmul`
        monkeypatch.setattr(dispatch, "matmul", lambda p, x, bias: dispatch.gemv_h2(
            p, x, bias, {"BLOCK_N": 64, "SPLIT_K": 2, "num_warps": 1}))
    k, n = 96, 40
    p = random_packed("int", 3, 32, k, n, device=DEV)
    prep = dispatch.prepare("int", 3, 32, k, n, p)
    x = torch.randn(1, k, device=DEV, dtype=torch.float16)
    bias = torch.randn(n, device=DEV, dtype=torch.float16)
    args = (x, prep.q0, prep.q1, prep.scales, prep.zeros, bias, prep.fmt, prep.bits, prep.gs, k, n, prep.has_zero)
    y = torch.ops.quantkit.wq_matmul(*args)
    assert y.shape == (1, n) and torch.equal(y, dispatch.matmul(prep, x, bias))
    torch.library.opcheck(torch.ops.quantkit.wq_matmul, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("case", [("int", 4, 128), ("int", 3, 128), ("int", 2, 64), ("hlq", 4, 128),
                                  ("hlq", 3, 128), ("hlq", 2, 64), ("int", 4, None)], ids=str)
def test_gpu_real_shapes(case):
    fmt, bits, gs = case
    k, n = 4096, 14336
    p = random_packed(fmt, bits, gs, k, n, device="cuda")
    mod = QuantLinear(k, n, WeightSpec(format=fmt, bits=bits, group_size=gs), p).cuda()
    for m in (1, 16, 1024):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = _ref(p, fmt, bits, gs, k, x, dtype=torch.float64)
        y = mod(x)
        bf16 = _rel(ref.to(torch.bfloat16), ref)  # the rounding of the output alone
        assert _rel(y, ref) < 2 * bf16 + 1e-3, (m, _rel(y, ref), bf16)
        for path in ("gemv", "gemv_f32", "gemm", "dequant"):
            if path.startswith("gemv") and m > 16:
                continue
            yp = dispatch.matmul(dispatch.prepared_for(mod), x, None, path)
            assert _rel(yp, ref) < 2 * bf16 + 5e-3, (path, m, _rel(yp, ref), bf16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("case", [("int", 4, 128), ("int", 3, 64), ("hlq", 2, 64), ("hlq", 4, 128)], ids=str)
def test_gpu_gemv_h2_activation_range(case):
    """The half2 GEMV rescales x per K slice into fp16 range: massive activation channels (2e4, beyond fp16's
    reach once multiplied by a code), tiny activations (1e-6) and a K that is not a multiple of 32 keep the
    error at the bf16 rounding of the output."""
    fmt, bits, gs = case
    k, n = 4000, 3000
    p = random_packed(fmt, bits, gs, k, n, device="cuda")
    prep = dispatch.prepare(fmt, bits, gs, k, n, p)
    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(2, k, device="cuda", generator=g)
    outl = base.clone()
    outl[:, 17] = 2e4
    outl[:, 1000:1004] *= 300
    for x in (base, outl, base * 1e-6):
        x = x.to(torch.bfloat16)
        ref = _ref(p, fmt, bits, gs, k, x, dtype=torch.float64)
        y = dispatch.matmul(prep, x, None, "gemv")
        bf16 = _rel(ref.to(torch.bfloat16), ref)
        assert _rel(y, ref) < 2 * bf16 + 1e-3, (_rel(y, ref), bf16)
        # long slices (one scale S over 2000 channels) keep the precision too
        yl = dispatch.gemv_h2(prep, x, None, {"BLOCK_N": 256, "SPLIT_K": 2, "num_warps": 1})
        assert _rel(yl, ref) < 2 * bf16 + 1e-3, (_rel(yl, ref), bf16)


_KERNEL_MODULES = ("triton_common", "reference", "wq_gemm", "wq_gemv", "dispatch", "int8_reference", "int8_common",
                   "int8_gemm", "int8_prefill", "nvfp4_reference", "nvfp4_tuning", "nvfp4_dispatch", "nvfp4_gemm",
                   "act_dispatch", "decode_attention_reference", "decode_attention", "registry")


def test_import_direction():
    """quantkit.nn does not import the kernels (they register themselves lazily); no kernel module imports
    quantkit.nn, the pipeline, the methods or quantkit.eval."""
    import subprocess
    import sys

    checks = [
        "import sys, quantkit.nn\n"
        "assert not [m for m in sys.modules if m.startswith('quantkit.kernels') or m == 'triton']",
        f"import importlib, sys\n"
        f"for name in {_KERNEL_MODULES!r}:\n"
        f"    importlib.import_module('quantkit.kernels.' + name)\n"
        f"bad = [m for m in sys.modules if m.startswith(('quantkit.nn', 'quantkit.pipeline', 'quantkit.methods',"
        f" 'quantkit.eval', 'quantkit.api'))]\n"
        f"assert not bad, bad",
    ]
    for code in checks:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "TRITON_INTERPRET": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
