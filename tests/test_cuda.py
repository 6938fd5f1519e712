"""The pipeline and checkpoints on a GPU (skipped without CUDA; run on the lent GPU machine)."""

import pytest
import torch

from conftest import tiny_llama
from quantkit.checkpoint import load, save
from quantkit.nn import QuantLinear
from quantkit.pipeline import quantize_model
from quantkit.recipe import load_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("recipe", ["rtn-w4g128", "gptq-w3g128", "hlq-w2g64"])
def test_quantize_on_cuda_matches_cpu_and_round_trips(recipe, calib, tmp_path):
    cpu, gpu = tiny_llama(), tiny_llama()
    quantize_model(cpu, load_recipe(recipe), calib, device="cpu", progress=False)
    quantize_model(gpu, load_recipe(recipe), calib, device="cuda", progress=False)
    # the model stays where it was; every layer visited the GPU for its turn
    assert next(gpu.parameters()).device.type == "cpu"
    qc = {n: m for n, m in cpu.named_modules() if isinstance(m, QuantLinear)}
    qg = {n: m for n, m in gpu.named_modules() if isinstance(m, QuantLinear)}
    assert qc.keys() == qg.keys()
    if recipe.startswith("rtn"):  # no data involved: the same codes up to a rare rounding tie
        for n in qc:
            wc, wg = qc[n].dequantize_weight(), qg[n].dequantize_weight()
            assert ((wc - wg).abs() > 1e-6).float().mean() < 0.01, n
    # with calibration, float differences between devices flip rounding ties that GPTQ's error feedback
    # carries on (and later layers see other inputs), so compare quality, not codes
    fp = tiny_llama()
    with torch.no_grad():
        ref = fp(calib).logits
        err_cpu = float((cpu(calib).logits - ref).norm() / ref.norm())
        err_gpu = float((gpu(calib).logits - ref).norm() / ref.norm())
    assert err_gpu < 1.3 * err_cpu + 1e-3, (err_gpu, err_cpu)
    gpu = gpu.cuda()
    out = save(gpu, tmp_path / "ck")
    loaded = load(out, device="cuda")
    x = calib.cuda()
    with torch.no_grad():
        assert torch.equal(gpu(x).logits, loaded(x).logits)


@pytest.mark.parametrize("fit", ["als", "adam"])
def test_hlq_fit_on_cuda_is_deterministic(fit):
    # scatter-add on a GPU sums in the order its atomics land; the fit must not depend on it (several
    # processes and one must write the same checkpoint)
    from quantkit.formats import HLQ

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(2048, 8, 128, generator=g) * torch.rand(2048, 1, 1, generator=g)).cuda()
    fmt = HLQ(3, 128, fit=fit, iterations=8)
    a, b = fmt.fit(w), fmt.fit(w.clone())
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("recipe,key", [("flexq-w6a6", "int:int6"), ("comet-w4ax", "fmpq:int"),
                                        ("arcquant-nvfp4", "nvfp4:nvfp4"), ("w4a8-rtn", "int:int")])
def test_activation_kernels_match_reference_end_to_end(recipe, key, calib):
    """A model quantized with an activation recipe gives the same logits through the Triton kernels as
    through the torch reference on the same GPU (bf16), and the kernels really serve its Linears."""
    from quantkit.nn import KERNELS

    m = tiny_llama()
    quantize_model(m, load_recipe(recipe), calib, progress=False)
    m = m.to("cuda", torch.bfloat16)
    x = calib[:2].cuda()
    served = 0
    for mod in m.modules():
        if isinstance(mod, QuantLinear):
            assert mod.kernel_key == key
            xin = torch.randn(3, mod.in_features, device="cuda", dtype=torch.bfloat16)
            served += KERNELS[key](mod, xin) is not None
    assert served > 0
    with torch.no_grad():
        y_kernel = m(x).logits.float()
        saved = KERNELS.pop(key)
        try:
            y_ref = m(x).logits.float()  # the torch reference in bf16 (activations rounded to bf16)
            y32 = m.float()(x).logits  # the same quantized model's math in fp32
        finally:
            KERNELS[key] = saved
    # "within bf16 rounding": the kernels (fp32 scales, exact integer / FP4 products) are no further from the
    # fp32 evaluation of the quantized model than the bf16 torch reference is
    err_kernel = float((y_kernel - y32).norm() / y32.norm())
    err_ref = float((y_ref - y32).norm() / y32.norm())
    assert err_kernel < 1.5 * err_ref + 2e-3, (err_kernel, err_ref)


def test_compiled_fused_model_matches_eager_kernels(calib):
    """torch.compile (inductor) traces fused weight-only QuantLinears into the kernels' custom op: same
    logits as the eager kernel path, at prompt (GEMM) and single-token (GEMV) shapes."""
    from quantkit.nn.fused import fuse_shared_input_linears

    m = tiny_llama()
    quantize_model(m, load_recipe("rtn-w4g128"), calib, progress=False)
    m = m.to("cuda", torch.bfloat16)
    fuse_shared_input_linears(m)
    compiled = torch.compile(m)
    for x in (calib[:2].cuda(), calib[:1, :1].cuda()):
        with torch.no_grad():
            eager = m(x).logits  # also builds every module's kernel-ready weights before tracing
            out = compiled(x).logits
        torch.testing.assert_close(out.float(), eager.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("recipe", ["flexq-w6a8", "comet-w4ax", "arcquant-nvfp4", "w4a8-rtn"])
def test_compiled_activation_quantized_model_traces_kernel_ops(recipe, calib):
    """torch.compile traces activation-quantized QuantLinears into their custom ops (one graph, no breaks):
    same logits as the eager kernels at prompt and single-token shapes."""
    from quantkit.nn.fused import fuse_shared_input_linears

    m = tiny_llama()
    quantize_model(m, load_recipe(recipe), calib, progress=False)
    m = m.to("cuda", torch.bfloat16)
    fuse_shared_input_linears(m)
    graphs, ops = [], set()

    def backend(gm, example_inputs):
        graphs.append(gm)
        ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    compiled = torch.compile(m, backend=backend)
    for x in (calib[:2].cuda(), calib[:1, :1].cuda()):
        with torch.no_grad():
            eager = m(x).logits  # builds every module's kernel-ready weights before tracing
            out = compiled(x).logits
        torch.testing.assert_close(out.float(), eager.float(), rtol=2e-2, atol=2e-2)
    op = "quantkit.arc_act_linear" if recipe.startswith("arc") else "quantkit.lowbit_act_linear"
    assert any(op in o for o in ops), sorted(ops)[:20]
    assert len(graphs) == 2  # one graph per input shape: no graph breaks


def test_workspace_prefetch_matches_plain_workspace_path(calib):
    """kernels/prefetch.py: with the next Linear's weight dequantized on a side stream, a prefill-size forward
    gives the plain workspace path's logits bit for bit, eagerly and replayed from a CUDA graph, and every
    Linear but the first of a forward finds its weight prefetched."""
    from quantkit.kernels import prefetch
    from quantkit.nn.fused import fuse_shared_input_linears

    m = tiny_llama()
    quantize_model(m, load_recipe("rtn-w4g128"), calib, progress=False)
    m = m.to("cuda", torch.bfloat16)
    fuse_shared_input_linears(m)
    x = calib.cuda()  # 4 x 64 = 256 rows: the workspace path for int4
    with torch.no_grad():
        plain = m(x).logits
        plan = prefetch.install(m)
        assert plan is not None and len(plan.members) == 2 * 4  # per layer: qkv, o, gate_up, down
        torch.testing.assert_close(m(x).logits, plain, rtol=0, atol=0)  # learns the order
        assert (plan.hits, plan.misses) == (0, len(plan.members))
        got = m(x).logits
        assert (plan.hits, plan.misses) == (len(plan.members) - 1, len(plan.members) + 1)
        torch.testing.assert_close(got, plain, rtol=0, atol=0)
        static_x = x.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            m(static_x)  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = m(static_x).logits
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, plain, rtol=0, atol=0)
        prefetch.uninstall(m)
        assert prefetch.lookup(plan.members[0]) is None
        torch.testing.assert_close(m(x).logits, plain, rtol=0, atol=0)
