"""Write a random-weight Llama-architecture checkpoint (HF folder, bf16 safetensors shards + index + tokenizer)
of any size, one tensor at a time: the whole model is never in memory (at most one shard's worth).

    python -m quantkit.eval.make_random_checkpoint out/rand-3g --preset cpu-3g
    python -m quantkit.eval.make_random_checkpoint /tmp/llama3-8b --preset llama3-8b --device cuda \\
        --tokenizer out/gpu/tokenizer

Presets: `llama3-8b` (hidden 4096, intermediate 14336, 32 layers, 32 heads / 8 KV heads, vocab 128256,
untied; 16.1 GB in bf16) and `cpu-3g` (hidden 2048, intermediate 5632, 36 layers, 32 / 4 heads, vocab 49152
= the demo tokenizer's, untied; 3.6 GB) and `cpu-4g` (hidden 768, intermediate 2048, 300 layers, 12 / 4 heads,
vocab 49152, untied; 3.9 GB: many narrow layers, so the per-layer working set is small next to the file). Any field can be overridden (--layers, --hidden, ...). Weights are N(0, 0.02) (Linear and
embedding), norms 1, drawn from one seeded generator per tensor so a given shape always gives the same file.
The tokenizer (default: the demo model's, `quantkit.models.demo_model_dir()`) is copied as files; token ids
it produces must be < vocab.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

PRESETS = {
    "llama3-8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256, tie=False),
    "cpu-3g": dict(hidden=2048, intermediate=5632, layers=36, heads=32, kv_heads=4, vocab=49152, tie=False),
    # many narrow layers: >= 3 GB with the smallest per-layer working set (what the CPU RSS measurement needs)
    "cpu-4g": dict(hidden=768, intermediate=2048, layers=300, heads=12, kv_heads=4, vocab=49152, tie=False),
    "tiny": dict(hidden=128, intermediate=320, layers=4, heads=4, kv_heads=2, vocab=49152, tie=True),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def tensor_plan(a: argparse.Namespace) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor, in file order (HF Llama names)."""
    h, i, hd = a.hidden, a.intermediate, a.hidden // a.heads
    plan = [("model.embed_tokens.weight", (a.vocab, h))]
    for li in range(a.layers):
        p = f"model.layers.{li}."
        plan += [(p + "input_layernorm.weight", (h,)),
                 (p + "self_attn.q_proj.weight", (a.heads * hd, h)),
                 (p + "self_attn.k_proj.weight", (a.kv_heads * hd, h)),
                 (p + "self_attn.v_proj.weight", (a.kv_heads * hd, h)),
                 (p + "self_attn.o_proj.weight", (h, a.heads * hd)),
                 (p + "post_attention_layernorm.weight", (h,)),
                 (p + "mlp.gate_proj.weight", (i, h)),
                 (p + "mlp.up_proj.weight", (i, h)),
                 (p + "mlp.down_proj.weight", (h, i))]
    plan.append(("model.norm.weight", (h,)))
    if not a.tie:
        plan.append(("lm_head.weight", (a.vocab, h)))
    return plan


def make_tensor(name: str, shape: tuple[int, ...], seed: int, device: str) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(seed)
    t = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=g)
    return t.to(torch.bfloat16).cpu()


def main(argv=None) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-3g")
    for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--shard-size", default="2GB", help="Maximum bytes per shard (e.g. 500MB, 2GB).")
    ap.add_argument("--tokenizer", type=Path, default=None, help="Folder to copy tokenizer files from "
                    "(default: the demo model's).")
    ap.add_argument("--device", default="cpu", help="Where random numbers are drawn (cuda is much faster).")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for k, v in PRESETS[a.preset].items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    from quantkit.calibration_store import format_size, parse_size

    max_shard = parse_size(a.shard_size)
    plan = tensor_plan(a)
    sizes = [2 * int(torch.Size(s).numel()) for _, s in plan]
    # shards: consecutive tensors up to max_shard bytes, planned up front so names carry the total count
    groups, cur, size = [], [], 0
    for (name, shape), nb in zip(plan, sizes, strict=True):
        if cur and size + nb > max_shard:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nb
    groups.append(cur)
    tmp = a.out.with_name(a.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    weight_map = {}
    seed = a.seed
    for gi, group in enumerate(groups):
        fname = f"model-{gi + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            tensors[name] = make_tensor(name, shape, seed, a.device)
            seed += 1
            weight_map[name] = fname
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
        print(f"  {fname}: {len(group)} tensors ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    total = sum(sizes)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      tie_word_embeddings=a.tie, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None)
    cfg.architectures = ["LlamaForCausalLM"]
    d = cfg.to_dict()
    d["dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(d, indent=2))
    tok_dir = a.tokenizer
    if tok_dir is None:
        from quantkit.models import demo_model_dir

        tok_dir = demo_model_dir()
    for f in TOKENIZER_FILES:
        if (tok_dir / f).exists():
            shutil.copyfile(tok_dir / f, tmp / f)
    if a.out.exists():
        shutil.rmtree(a.out)
    tmp.rename(a.out)
    print(f"wrote {a.out}: {a.layers} layers, hidden {a.hidden}, {len(groups)} shards, {format_size(total)} "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
