"""Several processes (quantkit/distributed.py): exact reductions, and two CPU processes over gloo giving the
byte-identical checkpoint of one process, in memory and streamed; kill -9 of a rank and resume; a failing rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_offload import files_bytes, make_source, stream

import quantkit as qk
from conftest import tiny_llama
from quantkit import distributed
from quantkit.distributed import Dist, ExactSum, main_band
from quantkit.methods.gptq import HessianAccumulator
from quantkit.pipeline import quantize_model
from quantkit.recipe import load_recipe

HERE = Path(__file__).parent
RECIPES = ["rtn-w4g128", "gptq-w4g128", "w4a8-gptq"]  # no data; Hessians; an activation scheme + GPTQ
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}


def _terms(n=12, k=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):  # magnitudes over ~60 binades, some exact zeros
        t = torch.randn(k, k, generator=g) * 2.0 ** (i * 5 - 30)
        t[0, 1] = 0.0
        out.append(t.float())
    return out


def _merge(a: ExactSum, b: ExactSum) -> None:
    """What the int64 all-reduce does to two ranks' parts."""
    for band, chunks in b.bands.items():
        if band in a.bands:
            a.bands[band] = [x + y for x, y in zip(a.bands[band], chunks, strict=True)]
        else:
            a.bands[band] = chunks
    a.weight += b.weight


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(distributed, "ROWS", 10)  # 24 rows: chunks of 10, 10, 4


def test_exact_sum_is_independent_of_order_and_grouping(small_chunks):
    terms = _terms()
    ref = ExactSum()
    for t in terms:
        ref.add(t, 64)
    r = ref.result()
    # the same terms in reverse, and as two groups merged (what two ranks do): the same bits
    rev = ExactSum()
    for t in reversed(terms):
        rev.add(t, 64)
    assert torch.equal(rev.result(), r)
    a, b = ExactSum(), ExactSum()
    for t in terms[:5]:
        a.add(t, 64)
    for t in terms[5:]:
        b.add(t, 64)
    _merge(a, b)
    assert torch.equal(a.result(), r)
    # close to the float64 mean (each term keeps 46 bits below the top of its band)
    exact = sum(t.double() for t in terms) / len(terms)
    assert torch.allclose(r.double(), exact, rtol=1e-6, atol=0)
    # and a plain float32 running sum in another order is not bit-stable (why the scheme exists)
    f1, f2 = sum(terms), sum(reversed(terms))
    assert not torch.equal(f1, f2)


def test_exact_sum_main_band_and_row_panels(small_chunks):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, 16, 24, generator=g) * (1 + i / 4) for i in range(6)]  # windows of similar scale
    acc = HessianAccumulator(24, "cpu")
    shape, bound, rows = acc.window_rows(xs[0])
    full = rows(0, 24)
    assert shape == (24, 24) and bound >= float(full.abs().max())
    band = main_band(bound * 16)
    # terms given whole or by row panels land on the same integers; all share the main band. (The whole term
    # is assembled from the same panels: a multithreaded GEMM's row slice need not equal that slice of the
    # full product, and the pipeline only ever hands terms over by panels.)
    whole, panels = ExactSum(band), ExactSum(band)
    for x in xs:
        shape, bound, rows = acc.window_rows(x)
        whole.add(torch.cat([rows(lo, min(lo + 10, 24)) for lo in range(0, 24, 10)]), 16)
        panels.add_panels(shape, torch.device("cpu"), bound, rows, 16)
    assert list(whole.bands) == list(panels.bands) == [band]
    assert all(torch.equal(p, q) for p, q in zip(whole.bands[band], panels.bands[band], strict=True))
    # and the mean is the running accumulator's Hessian, to float32 rounding
    for x in xs:
        acc.add(x)
    assert torch.allclose(panels.result(), acc.result(), rtol=1e-5, atol=1e-6)
    # a window far above the first one gets a band of its own; the sum stays exact and order-free
    big = ExactSum(band)
    big.add(full * 2.0**20, 16)
    big.add(full, 16)
    assert len(big.bands) == 2


def test_exact_sum_carries_nonfinite_entries():
    t = torch.ones(3, 3)
    bad = torch.ones(3, 3)
    bad[1, 1] = float("nan")
    bad[0, 2] = float("inf")
    s = ExactSum()
    s.add(t, 1)
    s.add(bad, 1)
    r = s.result()
    assert torch.isnan(r[1, 1]) and r[0, 2] == float("inf") and r[2, 2] == 1.0


def test_cpu_factorization_bits_do_not_depend_on_the_callers_thread_count():
    # N processes on one host run with fewer intra-op threads each than one process; LAPACK's Cholesky gives
    # other bits with another thread count, so GPTQ factorizes on a fixed count (what made a GPU run with
    # host factorization differ between one and two processes sharing the host)
    from quantkit.methods.gptq import _inverse_cholesky

    x = torch.randn(2048, 512, generator=torch.Generator().manual_seed(0))
    h = x.T @ x / 2048
    old = torch.get_num_threads()
    try:
        got = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got.append(_inverse_cholesky(h.clone(), 0.01))
            assert torch.get_num_threads() == threads  # restored
    finally:
        torch.set_num_threads(old)
    assert torch.equal(got[0], got[1])
    assert torch.allclose(got[0].T @ got[0] @ (h + 0.01 * h.diagonal().mean() * torch.eye(512)), torch.eye(512),
                          atol=1e-3)


def test_shards_and_solve_assignment():
    d = [Dist(r, 3) for r in range(3)]
    assert [x.shard(8) for x in d] == [(0, 3), (3, 6), (6, 8)]
    assert d[0].assign([1.0, 5.0, 5.0, 2.0]) == [2, 0, 1, 2]  # longest first onto the least loaded rank
    with pytest.raises(qk.QuantkitError, match="at most 2 processes"):
        Dist(2, 3).shard(2)


def _calib():
    return torch.randint(0, 512, (5, 32), generator=torch.Generator().manual_seed(3))


def _one_process(src, out, name, calib):
    """The plain one-process checkpoints (in memory and streamed), one intra-op thread as the workers."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_llama()  # the weights make_source saved to `src`
        quantize_model(model, load_recipe(name), calib, progress=False)
        model.quantkit_recipe = load_recipe(name).to_dict()
        qk.save(model, out / f"mem-{name}")
        stream(src, out / f"off-{name}", name, calib, max_activation_memory="20KB")
    finally:
        torch.set_num_threads(old)


def test_two_processes_write_the_one_process_checkpoint(tmp_path):
    src = tmp_path / "src"
    make_source(src)
    calib = _calib()
    torch.save(calib, tmp_path / "calib.pt")
    # torchrun itself (the module torch.distributed.run), two workers over gloo, all recipes in one group
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(HERE / "dist_worker.py"), str(src), str(tmp_path / "two"), str(tmp_path / "calib.pt"),
                        ",".join(RECIPES)], capture_output=True, text=True, env={**os.environ, **ENV}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in RECIPES:
        _one_process(src, tmp_path / "one", name, calib)
        for mode in ("mem", "off"):
            one, two = files_bytes(tmp_path / "one" / f"{mode}-{name}"), files_bytes(tmp_path / "two" / f"{mode}-{name}")
            assert one.keys() == two.keys() and all(one[k] == two[k] for k in one), (mode, name)
    qc = json.loads((tmp_path / "two" / "off-w4a8-gptq" / "config.json").read_text())["quantization_config"]
    assert all(e.get("act") for e in qc["modules"].values())


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "quantkit.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **ENV, **(env or {})}, timeout=600)


def test_killed_rank_resumes_to_the_identical_checkpoint_and_a_failing_rank_is_one_line(tmp_path):
    src = tmp_path / "src"
    _, text = make_source(src, layers=3, tokenizer=True)
    settings = dict(dataset=str(text), nsamples=4, seq_len=32, max_activation_memory="20KB")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stream(src, tmp_path / "ref", "gptq-w3g128", **settings)  # one process, uninterrupted
    finally:
        torch.set_num_threads(old)
    args = ["quantize", src, "--recipe", "gptq-w3g128", "--out", tmp_path / "q", "--offload", "--dataset", text,
            "--nsamples", 4, "--seq-len", 32, "--max-activation-memory", "20KB", "--nproc", 2]
    # a rank that fails (here: rank 1 while rank 0 waits for it): one line, nonzero, nothing at --out
    failed = cli(*args, env={"QUANTKIT_DEBUG_KILL": "raise-after-acts:1@1"})
    assert failed.returncode == 2, failed.stderr[-3000:]
    lines = [ln for ln in failed.stderr.splitlines() if "error" in ln.lower()]
    assert lines == ["error: debug failure at after-acts of layer 1 on rank 1"], failed.stderr[-3000:]
    assert not (tmp_path / "q").exists()
    # kill -9 of rank 1 after it wrote its share of layer 1's activations: the launcher stops rank 0
    killed = cli(*args, env={"QUANTKIT_DEBUG_KILL": "after-acts:1@1"})
    assert killed.returncode == 1, killed.stderr[-3000:]
    assert "error: process 1 of 2 was killed (SIGKILL)" in killed.stderr
    assert not (tmp_path / "q").exists() and (tmp_path / "q.partial" / "offload-manifest.json").exists()
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 of 3 layers were done" in again.stderr
    assert files_bytes(tmp_path / "q") == files_bytes(tmp_path / "ref")


def test_failure_cause_names_the_killed_process_not_the_ones_the_launcher_stopped():
    # rank 1 killed; rank 0 still running when the launcher noticed, so it was stopped with SIGTERM (seen on
    # a loaded 2-core machine) or it saw the collective break first and left an "other" message
    cause = distributed.failure_cause
    assert cause({0: -15, 1: -9}, 2, None) == "process 1 of 2 was killed (SIGKILL)"
    assert cause({0: 3, 1: -9}, 2, (0, "Connection closed by peer")) == "process 1 of 2 was killed (SIGKILL)"
    assert cause({0: 3, 1: -15}, 2, (0, "boom")) == "process 0 of 2 failed (boom)"
    assert cause({0: -15, 1: -15}, 2, None) == "process 0 of 2 was killed (SIGTERM)"  # all stopped: say so
    assert cause({1: 7}, 2, None) == "process 1 of 2 failed with exit status 7"


def test_dry_run_estimates_per_process(tmp_path):
    from quantkit.eval.bench_scaleout import SHAPE_70B, estimate_for_shape

    e1, e4 = (estimate_for_shape(SHAPE_70B, "hlq-w3g128", 128, 2048, n) for n in (1, 4))
    # each process holds its quarter of the windows (inputs and outputs of a layer), the same layer
    assert e1["activation_bytes"] == 4 * e4["activation_bytes"] == 2 * 128 * 2048 * SHAPE_70B["hidden"] * 2
    assert e4["layer_source_bytes"] == e1["layer_source_bytes"] and e4["peak_vram_bytes"] < e1["peak_vram_bytes"]
    # the exact statistics sum: an int64 K x K band of the widest Linear (GPTQ hands its windows over by panels)
    assert e1["peak_vram_bytes"] > 8 * SHAPE_70B["intermediate"] ** 2
    src = tmp_path / "src"
    make_source(src)
    r = cli("quantize", src, "--recipe", "gptq-w4g128", "--out", tmp_path / "q", "--offload", "--dry-run",
            "--nproc", 2, "--nsamples", 8, "--seq-len", 32)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "per process of 2" in r.stderr and not (tmp_path / "q").exists()
