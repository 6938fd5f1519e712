"""Peer benchmark: llm-compressor's GPTQ and HQQ on the demo model, evaluated by quantkit's own evaluator.

    python eval/peers/run_peers.py --json docs/results/peers.json [--configs ...] [--venv DIR]

A documented evaluation job, not part of the tests. The peers pin other library versions than quantkit
(llm-compressor 0.14 needs transformers <= 5.17), so they run in a separate virtual environment: --venv
(default ~/.cache/quantkit/peers-venv) is created when missing, with the interpreter's system site-packages
visible (its torch is reused when it has one), and `llmcompressor==0.14.0.1 hqq==0.2.8.post1` are installed
into it with pip. Run this script itself with quantkit's environment.

Steps: draw the calibration windows exactly as `quantkit quantize` does (32 x 2048 tokens of PTB train, seed
0), hand them to eval/peers/peer_quantize.py in the peers' environment, which writes each peer's
fake-quantized weights as a plain HF folder; evaluate each folder with `quantkit eval ppl` on PTB test (first 8
windows) and the held-out text (enwiki test, first 4 windows); write JSON with the perplexities, the peers'
stored bits per weight (codes, scales and zero points as each library stores them), the versions of the
peers' environment (per row) and of the evaluator's (`env`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PINS = ("llmcompressor==0.14.0.1", "hqq==0.2.8.post1")
CONFIGS = ("llmc-gptq-w4g128-actorder", "llmc-gptq-w4g128", "llmc-gptq-w3g128-actorder", "llmc-gptq-w3g128",
           "hqq-w4g64", "hqq-w3g64")


def ensure_venv(venv: Path) -> Path:
    """The peers' interpreter, creating the environment on first use."""
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"creating the peers' environment {venv} ({', '.join(PINS)})", flush=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", *PINS], check=True)
    return py


def stored_bits(config: str, shapes: list[tuple[int, int]]) -> float:
    """Bits per weight of the decoder Linears as the peer stores them: llm-compressor's pack-quantized format
    (codes and zero points packed at the weight's bits, 16-bit scales per group), HQQ (codes, 16-bit scale and
    16-bit zero per group)."""
    bits = int(config.split("-w")[1][0])
    group = int(config.split("g")[-1].split("-")[0])
    per_group = 16 + bits if config.startswith("llmc") else 32
    total = sum(n * k * bits + n * -(-k // group) * per_group for n, k in shapes)
    return total / sum(n * k for n, k in shapes)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="Runs the peers in a separate virtual environment (--venv), created with "
                                        "pip when missing.")
    ap.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "quantkit" / "peers-venv")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ptb-windows", type=int, default=8)
    ap.add_argument("--heldout", default="enwiki")
    ap.add_argument("--heldout-windows", type=int, default=4)
    ap.add_argument("--out-dir", type=Path, default=Path("out/peers"))
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    import torch

    import quantkit as qk
    from quantkit.data import calibration_windows
    from quantkit.models import resolve_model_path

    configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        raise SystemExit(f"unknown config(s) {', '.join(bad)}: use {', '.join(CONFIGS)}")
    py = ensure_venv(args.venv)
    model_dir = resolve_model_path("demo")
    fp, tok = qk.load_model("demo")
    shapes = [tuple(m.weight.shape) for n, m in fp.named_modules()
              if isinstance(m, torch.nn.Linear) and ".layers." in n]
    del fp
    args.out_dir.mkdir(parents=True, exist_ok=True)
    calib_path = args.out_dir / "calibration.pt"
    torch.save(calibration_windows(tok, "ptb", args.nsamples, args.seq_len, args.seed), calib_path)
    from quantkit.eval.quality import environment

    doc = {"model": "demo", "env": environment("cpu"), "nsamples": args.nsamples, "seq_len": args.seq_len, "calibration_seed": args.seed,
           "texts": [{"dataset": "ptb", "windows": args.ptb_windows},
                     {"dataset": args.heldout, "windows": args.heldout_windows}],
           "command": "python eval/peers/run_peers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "rows": []}
    if args.json.exists():  # keep the rows of configs not run this time
        doc["rows"] = [r for r in json.loads(args.json.read_text()).get("rows", []) if r["config"] not in configs]
    env = {**os.environ, "PYTHONPATH": ""}
    for cfg in configs:
        out = args.out_dir / cfg
        t0 = time.perf_counter()
        subprocess.run([str(py), str(HERE / "peer_quantize.py"), "--model", str(model_dir), "--calib",
                        str(calib_path), "--config", cfg, "--out", str(out)], check=True, env=env)
        peer = json.loads((out / "peer.json").read_text())
        ppl = {}
        for ds, n in ((d["dataset"], d["windows"]) for d in doc["texts"]):
            res_path = out / f"ppl-{ds}.json"
            subprocess.run([sys.executable, "-m", "quantkit.cli", "eval", "ppl", str(out), "--dataset", ds,
                            "--max-windows", str(n), "--json", str(res_path)], check=True)
            ppl[ds] = json.loads(res_path.read_text())["ppl"]
        doc["rows"] = [r for r in doc["rows"] if r["config"] != cfg] + [
            {"config": cfg, "ppl": ppl, "bits_per_weight": stored_bits(cfg, shapes), "peer": peer,
             "wall_seconds": round(time.perf_counter() - t0, 1)}]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"{cfg}: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()), flush=True)


if __name__ == "__main__":
    main()
