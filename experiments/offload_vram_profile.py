"""Where a streamed layer's peak VRAM goes: run `quantize_streaming` under torch's memory history recorder
and write the snapshot (open it in https://pytorch.org/memory_viz, or summarize with --summarize).

    python experiments/offload_vram_profile.py MODEL_DIR --recipe hlq-w3g128 --out /tmp/o --dataset calib.txt \
        --nsamples 32 --snapshot $OUT/vram.pickle
    python experiments/offload_vram_profile.py --summarize vram.pickle      # live blocks at the peak
"""

from __future__ import annotations

import argparse
import collections
import pickle


def summarize(path: str, top: int = 25) -> None:
    with open(path, "rb") as f:
        snap = pickle.load(f)
    events = [e for dev in snap["device_traces"] for e in dev]
    live, cur, peak, peak_live = {}, 0, 0, {}
    for e in events:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
            if cur > peak:
                peak, peak_live = cur, dict(live)
        elif e["action"] in ("free_completed",) and e["addr"] in live:
            cur -= live.pop(e["addr"])["size"]
    print(f"peak of traced allocations: {peak / 2**30:.3f} GiB (allocations made before recording are not seen)")
    by_site = collections.Counter()
    for e in peak_live.values():
        frames = [f for f in e.get("frames", []) if "quantkit" in f["filename"] or "transformers" in f["filename"]]
        site = " <- ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']}:{f['name']}" for f in frames[:3]) or "?"
        by_site[site] += e["size"]
    for site, size in by_site.most_common(top):
        print(f"{size / 2**20:9.1f} MiB  {site}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--recipe", default="hlq-w3g128")
    ap.add_argument("--out")
    ap.add_argument("--dataset", default="ptb")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--snapshot", default="vram.pickle")
    ap.add_argument("--summarize", default=None)
    a = ap.parse_args(argv)
    if a.summarize:
        summarize(a.summarize)
        return
    import torch

    import quantkit as qk

    torch.cuda.memory._record_memory_history(max_entries=200_000)
    qk.quantize_streaming(a.model, a.recipe, a.out, dataset=a.dataset, nsamples=a.nsamples, seq_len=a.seq_len,
                          device="cuda", overwrite=True, progress=False)
    torch.cuda.memory._dump_snapshot(a.snapshot)
    print(f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.3f} GiB; snapshot {a.snapshot}")
    summarize(a.snapshot)


if __name__ == "__main__":
    main()
