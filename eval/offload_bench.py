"""Measure a streamed (disk offload) quantization: wall time, peak host RSS, peak VRAM; JSON out.

    python -m quantkit.eval.offload_bench out/rand-3g --recipe gptq-w4g128 --out out/rand-3g-w4 \\
        --nsamples 4 --seq-len 512 --json out/offload_cpu_gptq.json

Peak RSS is the OS figure for this process (`getrusage` ru_maxrss, the same number `/usr/bin/time -v`
prints as "Maximum resident set size"); peak VRAM is `torch.cuda.max_memory_allocated` (and reserved).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch


def main(argv=None) -> None:
    import quantkit as qk

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dataset", default="ptb")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-activation-memory", default="4GB")
    ap.add_argument("--offload-dir", default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    est = qk.quantize_streaming(a.model, a.recipe, a.out, dataset=a.dataset, nsamples=a.nsamples,
                                seq_len=a.seq_len, device=a.device, dry_run=True,
                                max_activation_memory=a.max_activation_memory)
    qk.quantize_streaming(a.model, a.recipe, a.out, dataset=a.dataset, nsamples=a.nsamples, seq_len=a.seq_len,
                          device=a.device, overwrite=True, max_activation_memory=a.max_activation_memory,
                          offload_dir=a.offload_dir, progress=False)
    wall = time.perf_counter() - t0
    res = {"model": a.model, "recipe": a.recipe, "nsamples": a.nsamples, "seq_len": a.seq_len,
           "device": a.device, "wall_s": round(wall, 1),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "source_bytes": est["source_bytes"], "layer_source_bytes": est["layer_source_bytes"],
           "activation_bytes": est["activation_bytes"], "estimate": est,
           "out_bytes": sum(p.stat().st_size for p in a.out.iterdir())}
    if torch.cuda.is_available() and a.device.startswith("cuda"):
        res["peak_vram_allocated_bytes"] = torch.cuda.max_memory_allocated()
        res["peak_vram_reserved_bytes"] = torch.cuda.max_memory_reserved()
        res["gpu"] = torch.cuda.get_device_name()
    gib = 1024**3
    print(f"offload bench: {a.recipe} on {a.device}: wall {wall:.1f} s, peak RSS "
          f"{res['peak_rss_bytes'] / gib:.3f} GiB ({res['peak_rss_bytes'] / res['source_bytes']:.1%} of the "
          f"{res['source_bytes'] / gib:.2f} GiB checkpoint)"
          + (f", peak VRAM {res['peak_vram_allocated_bytes'] / gib:.3f} GiB allocated / "
             f"{res['peak_vram_reserved_bytes'] / gib:.3f} GiB reserved" if "peak_vram_allocated_bytes" in res
             else ""), flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
