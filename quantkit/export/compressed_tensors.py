"""`quantkit export CKPT --to compressed-tensors`: a quantkit checkpoint as a compressed-tensors folder
(quant_method "compressed-tensors"), which transformers (with the compressed-tensors package) and vLLM load.

Every exported scheme is stored bit for bit: the integer / e2m1 codes and the scales quantkit stored are
re-laid-out, never re-quantized. Scheme → compressed-tensors (the layouts of compressed-tensors 0.20):

- `int` weights, b = 2..8 bits, symmetric or asymmetric, grouped or per-channel, 16-bit activations →
  format `pack-quantized`: `weight_packed int32 [N, ceil(K·b/32)]` (32 codes in b words, code i at stream bit
  i·b, stored value = q + 2^(b-1)), `weight_scale fp16 [N, K/g]` ([N, 1] per channel), `weight_shape`, and for
  asymmetric weights `weight_zero_point int32 [ceil(N·b/32), K/g]` (signed zero points packed along N).
  compressed-tensors dequantizes (q − zp)·scale with q and zp signed; quantkit's codes c and zeros z are
  unsigned, (c − z)·scale, so q = c − 2^(b-1) and zp = z − 2^(b-1): the packed stream holds c and z unchanged.
- `int6` weights (symmetric, q ∈ [−31, 31]) → the same `pack-quantized`, 6 bits, symmetric: quantkit's
  3-bytes-per-4-codes block layout is unpacked and re-packed into the dense 6-bit stream.
- `int` / `int6` weights with dynamic 8-bit `int` activations (W8A8, W4A8, W6A8) → `int-quantized` (the
  format compressed-tensors infers for int weights with int activations): `weight int8 [N, K]` = q,
  `weight_scale fp16`, `weight_zero_point int8 [N, K/g]` = zp (asymmetric, unpacked), input activations {int,
  8 bits, symmetric, dynamic, strategy token (per-token) or group}.
- `nvfp4` weights, 16-bit activations → `nvfp4-pack-quantized`: `weight_packed uint8 [N, K/2]` (the same
  nibble order), `weight_scale float8_e4m3fn [N, K/16]`, `weight_global_scale fp32 [1]` = 1 / tensor scale
  (compressed-tensors divides by it). Serving engines fuse q/k/v and gate/up under one global scale; quantkit
  fits one tensor scale per such group (`WeightFormat.bind`), so the members agree. A checkpoint whose members
  differ (written before quantkit shared them) is refused: re-deriving a shared scale would re-round every
  block scale.
- `nvfp4` weights with plain NVFP4 activations (`nvfp4-rtn`, no residual channels) → the same tensors plus
  `input_global_scale fp32 [1]` = 448·6 / amax, amax = the largest |x| recorded at calibration
  (`input_amax` of the module's activation entry; compressed-tensors' `generate_gparam` convention), the
  largest of a fused group's members for all of them; input activations {float, 4 bits, tensor_group 16,
  symmetric, dynamic "local": block scales per call, the global scale static}. quantkit's own runtime computes
  the activation tensor scale per call; a serving engine uses the recorded one, so activations above the
  calibration amax saturate there.

Refused, one line each, nothing written (QuantkitError): group sizes that do not divide K; q/k/v or gate/up
with different schemes; HLQ weights, ARCQuant residual channels, COMET's mixed INT4/INT8 blocks, activations
below 8 bits (W6A6, W4A4 int), NVFP4 W4A4 checkpoints without a recorded activation amax (written before
quantkit recorded it) and the KV4 cache — each message names the nearest shipped recipe that exports.
"""

from __future__ import annotations

import json
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.export.common import copy_side_files, read_quantkit_config, write_config, write_folder

MISSING_EXTRA = ("--to compressed-tensors needs the compressed-tensors package: pip install 'quantkit[export]'")
FORMAT_PACKED = "pack-quantized"
FORMAT_INT = "int-quantized"
FORMAT_NVFP4 = "nvfp4-pack-quantized"
NVFP4_RANGE = 448.0 * 6.0  # e4m3 max · e2m1 max: a global scale maps the tensor's amax onto it
_NVFP4_ARGS = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
               "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": "torch.float8_e4m3fn"}


def _require_ct():
    try:
        import compressed_tensors
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: F401
        from compressed_tensors.quantization import QuantizationConfig  # noqa: F401
    except ImportError:
        raise QuantkitError(MISSING_EXTRA) from None
    return compressed_tensors


# ---------------------------------------------------------------------------------------------- scheme map


def _shipped(name: str, fallback: str) -> str:
    from quantkit.recipe import shipped_recipes

    return name if name in shipped_recipes() else fallback


def _method_of(qc: dict, entry: dict) -> str:
    m = entry.get("method") or ((qc.get("recipe") or {}).get("method") or {}).get("name") or "rtn"
    return "gptq" if m == "gptq" else "rtn"


def _divisor_hint(k: int) -> str:
    for g in (128, 64, 32, 16):
        if k % g == 0:
            return f"group_size {g}"
    return "per-channel weights (group_size: null)"


def scheme_for(name: str, entry: dict, qc: dict) -> tuple[str, dict, dict | None]:
    """(compressed-tensors format, weight QuantizationArgs fields, input-activation fields or None) for one
    module's quantkit entry, or a one-line QuantkitError saying why it has no exact compressed-tensors form
    and which shipped recipe does."""
    fmt, bits = entry.get("format"), int(entry.get("bits", 0))
    g = entry.get("group_size")
    k = int(entry["in_features"])  # the model's K (weight_in_features adds ARCQuant's refused residual columns)
    act = entry.get("act")
    where = f"module '{name}'"
    if fmt == "hlq":
        alt = _shipped(f"{_method_of(qc, entry)}-w{bits}g{g}", _shipped(f"gptq-w{bits}g128", "gptq-w4g128"))
        raise QuantkitError(f"{where}: HLQ weights (per-plane scales and a float offset) have no compressed-tensors "
                            f"form; the nearest exportable recipe is '{alt}' (uniform {bits}-bit integers)")
    if act is not None:
        afmt, abits = act.get("format"), int(act.get("bits", 0))
        if afmt == "nvfp4" and int(act.get("residual_channels", 0)) > 0:
            raise QuantkitError(f"{where}: ARCQuant's residual activation channels have no compressed-tensors "
                                f"form; the nearest exportable recipe is 'nvfp4-w4a16' (NVFP4 weights, 16-bit "
                                f"activations)")
        if afmt == "nvfp4" and act.get("input_amax") is None:
            raise QuantkitError(f"{where}: NVFP4 W4A4 needs an input_global_scale from an activation amax "
                                f"recorded at calibration and this checkpoint has none (written before quantkit "
                                f"recorded it): re-quantize it with this version, or export 'nvfp4-w4a16'")
        if afmt == "fmpq":
            raise QuantkitError(f"{where}: COMET activations (mixed INT4/INT8 blocks over permuted channels) "
                                f"have no compressed-tensors form; the nearest exportable recipe is 'w4a8-rtn' "
                                f"(4-bit g128 weights, dynamic per-token INT8 activations)")
        if afmt not in ("int", "nvfp4"):
            raise QuantkitError(f"{where}: activation format '{afmt}' has no compressed-tensors form; the "
                                f"nearest exportable recipe is 'w4a8-rtn'")
        if afmt == "int" and abits != 8:
            alt = "flexq-w6a8" if fmt == "int6" or bits == 6 else "w4a8-rtn"
            raise QuantkitError(f"{where}: {abits}-bit activations (W{bits}A{abits}) have no compressed-tensors "
                                f"form that matches quantkit's (symmetric ±{(1 << (abits - 1)) - 1}) or that a "
                                f"serving engine runs; the nearest exportable recipe is '{_shipped(alt, 'w4a8-rtn')}' "
                                f"(8-bit activations)")
    if fmt not in ("int", "int6", "nvfp4"):
        raise QuantkitError(f"{where}: weight format '{fmt}' has no compressed-tensors form; the nearest "
                            f"exportable recipe is 'rtn-w4g128'")
    if g is not None and k % int(g):
        raise QuantkitError(f"{where}: group_size {g} does not divide its {k} input features, and "
                            f"compressed-tensors stores whole groups only; re-quantize with {_divisor_hint(k)} "
                            f"(a group size that divides every Linear's input features) or per-channel")
    if fmt == "nvfp4":
        acts = None
        if act is not None:  # plain NVFP4 activations (residual channels were refused above)
            acts = {**_NVFP4_ARGS, "dynamic": "local", "observer": "static_minmax"}
        return FORMAT_NVFP4, {**_NVFP4_ARGS, "dynamic": False}, acts
    if act is not None and act.get("format") != "int":
        raise QuantkitError(f"{where}: NVFP4 activations with '{fmt}' weights have no compressed-tensors form; "
                            f"the nearest exportable recipe is 'nvfp4-rtn'")
    sym = True if fmt == "int6" else bool(entry.get("symmetric"))
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
               "strategy": "group" if g is not None else "channel"}
    if g is not None:
        weights["group_size"] = int(g)
    acts = None
    if act is not None:
        ag = act.get("group_size")
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True,
                "strategy": "token" if ag is None else "group"}
        if ag is not None:
            acts["group_size"] = int(ag)
    # int weights with int activations: `int-quantized` (int8 codes, unpacked), the format compressed-tensors
    # itself infers for such a scheme and the one vLLM's W8A8 / W4A8 int readers load
    return (FORMAT_INT if acts is not None else FORMAT_PACKED), weights, acts


def plan(qc: dict) -> dict[str, tuple[str, dict, dict | None]]:
    """module name -> compressed-tensors scheme for every quantized module of a checkpoint config (the checks
    that need no tensors: a refusal here is raised before anything is loaded)."""
    kv = qc.get("kv_cache")
    if kv:
        raise QuantkitError(f"the KV4 cache (kv_cache: {kv.get('format', kv) if isinstance(kv, dict) else kv}) "
                            f"has no compressed-tensors form; the nearest exportable recipe is 'w4a8-rtn' "
                            f"(weights and activations without the 4-bit KV cache)")
    return {name: scheme_for(name, entry, qc) for name, entry in qc.get("modules", {}).items()}


def _words(s: tuple[str, dict, dict | None] | None) -> str:
    if s is None:
        return "not quantized"
    _, w, a = s
    g = f"g{w['group_size']}" if w.get("group_size") else "per-channel"
    t = "nvfp4" if w["type"] == "float" else f"int{w['num_bits']}{'' if w['symmetric'] else ' asym'}"
    if a and a["type"] == "float":
        return f"{t} {g} + nvfp4 activations"
    return f"{t} {g}" + (f" + int8 {a['strategy']} activations" if a else "")


def fused_groups(model) -> list[list[str]]:
    """Full names of the Linears serving engines fuse into one matrix (q/k/v, gate/up), per group."""
    from torch import nn

    from quantkit.adapters import adapter_for
    from quantkit.nn import QuantLinear

    out = []
    for parent, mod in model.named_modules():
        for group in adapter_for(model, check=False).fusable_groups:
            members = [(f"{parent}.{n}" if parent else n) for n in group if isinstance(getattr(mod, n, None),
                                                                                    (nn.Linear, QuantLinear))]
            if len(members) > 1:
                out.append(members)
    return out


def shared_input_amax(model, schemes: dict) -> dict[str, float]:
    """module name -> the activation amax its input_global_scale is made from: the largest recorded amax of
    its fused group (q/k/v read one input, so theirs agree; the largest keeps every member unsaturated)."""
    amax = {n: float(model.get_submodule(n).act.input_amax) for n, s in schemes.items() if s[2] is not None
            and s[0] == FORMAT_NVFP4}
    for members in fused_groups(model):
        shared = [amax[m] for m in members if m in amax]
        if shared:
            amax.update(dict.fromkeys((m for m in members if m in amax), max(shared)))
    return amax


def check_fused(model, schemes: dict) -> None:
    """q/k/v and gate/up (the projections serving engines fuse into one matrix) need one scheme, and with
    NVFP4 one tensor scale; a one-line QuantkitError otherwise."""
    for members in fused_groups(model):
        group = [m.rsplit(".", 1)[-1] for m in members]
        first = members[0]
        for other in members[1:]:
            if schemes.get(first) != schemes.get(other):
                raise QuantkitError(
                    f"'{first}' ({_words(schemes.get(first))}) and '{other}' ({_words(schemes.get(other))}) "
                    f"differ, but serving engines fuse {'/'.join(group)} into one matrix with one scheme: "
                    f"quantize them alike (one recipe override matching all of {', '.join(group)})")
        s = schemes.get(first)
        if s is not None and s[0] == FORMAT_NVFP4:
            scales = {m: float(model.get_submodule(m).tensor_scale.reshape(-1)[0]) for m in members}
            other = next((m for m in members if scales[m] != scales[first]), None)
            if other is not None:
                raise QuantkitError(
                    f"'{first}' and '{other}' have different NVFP4 tensor scales ({scales[first]:.6g} vs "
                    f"{scales[other]:.6g}): serving engines fuse {'/'.join(group)} under one global scale, "
                    f"and re-deriving a shared one would re-round every block scale; re-quantize with this "
                    f"quantkit version (it fits one tensor scale per fused group), or use --dequantize")


# ---------------------------------------------------------------------------------------------- tensors


def input_global_scale(amax: float):
    """compressed-tensors' input_global_scale for an activation amax: 448·6 / amax in fp32, [1] (its
    `generate_gparam`; 1.0 where the amax is 0, as there)."""
    import torch

    a = torch.tensor(amax, dtype=torch.float32)
    gs = torch.tensor(NVFP4_RANGE, dtype=torch.float32) / a.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.nan_to_num(gs, nan=1.0, posinf=1.0, neginf=1.0).reshape(1)


def module_tensors(m, scheme: tuple[str, dict, dict | None], amax: float | None = None) -> dict:
    """The compressed-tensors tensors (local names) of QuantLinear `m` under `scheme` (amax: the activation amax
    of its input_global_scale, for NVFP4 activations)."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    fmt, w, a = scheme
    n, k = m.out_features, m.weight_in_features
    if fmt == FORMAT_NVFP4:
        kp = m.fmt.padded_k(k)
        if kp != k:  # excluded by the group-size check; kept as a guard
            raise QuantkitError(f"NVFP4 module with {k} input features (not a multiple of 16)")
        ts = m.tensor_scale.reshape(-1)[0].float()
        out = {"weight_packed": m.qweight.contiguous(),
               "weight_scale": m.block_scales.contiguous(),
               "weight_global_scale": (1.0 / ts).reshape(1).float()}
        if a is not None:
            out["input_global_scale"] = input_global_scale(amax)
        return out
    bits = w["num_bits"]
    half = 1 << (bits - 1)
    codes, params = m.fmt.unpack(m.packed(), m.fmt.padded_k(k))
    q = (codes[:, :k].to(torch.int16) - half).to(torch.int8)
    scale = params["scale"].to(torch.float16).contiguous()  # fp16-exact in quantkit: lossless
    out = {}
    if fmt == FORMAT_INT:
        out["weight"] = q.contiguous()
    else:
        out["weight_packed"] = pack_to_int32(q, bits)
    out["weight_scale"] = scale
    if fmt == FORMAT_PACKED:
        out["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
    if not w["symmetric"]:
        zp = (params["zero"].round().to(torch.int16) - half).to(torch.int8).contiguous()
        out["weight_zero_point"] = zp if fmt == FORMAT_INT else pack_to_int32(zp, bits, packed_dim=0)
    return out


def quantization_config(schemes: dict, model, ct) -> dict:
    """config.json's `quantization_config`, as compressed-tensors' ModelCompressor writes it (validated by
    compressed-tensors' own pydantic models)."""
    from compressed_tensors.quantization import QuantizationConfig
    from torch import nn

    from quantkit.nn import QuantLinear

    by_scheme: dict[str, tuple[tuple, list[str]]] = {}
    for name, s in schemes.items():
        key = json.dumps(s, sort_keys=True)
        by_scheme.setdefault(key, (s, []))[1].append(name)
    ignore = [n for n, mod in model.named_modules()
              if isinstance(mod, nn.Linear) and not isinstance(mod, QuantLinear) and n not in schemes]
    groups = {}
    single = len(by_scheme) == 1
    for i, (s, names) in enumerate(by_scheme.values()):
        fmt, w, a = s
        groups[f"group_{i}"] = {"targets": ["Linear"] if single else sorted(names), "weights": w,
                                "input_activations": a, "output_activations": None, "format": fmt}
    formats = {s[0] for s, _ in by_scheme.values()}
    cfg = QuantizationConfig.model_validate({
        "config_groups": groups, "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed", "ignore": ignore, "kv_cache_scheme": None})
    return {"version": ct.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
            "transform_config": {}, **cfg.model_dump(exclude=["quant_method"], mode="json")}


# ---------------------------------------------------------------------------------------------- export


def export_compressed_tensors(ckpt, out, overwrite: bool = False, max_shard_bytes: int | None = None) -> Path:
    """Write quantkit checkpoint `ckpt` as a compressed-tensors folder at `out` (see the module docstring);
    a one-line QuantkitError, and nothing written, for a scheme it cannot store exactly."""
    from quantkit import checkpoint as ck
    from quantkit.nn import QuantLinear

    ckpt, out = Path(ckpt).expanduser(), Path(out).expanduser()
    ct = _require_ct()
    cfg, qc = read_quantkit_config(ckpt)
    schemes = plan(qc)
    ck.check_out_dir(out, overwrite)
    model = ck.load(ckpt)
    check_fused(model, schemes)
    amax = shared_input_amax(model, schemes)
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    tensors = {}
    for key, t in ck._state_for_saving(model).items():
        owner = next((n for n in qmods if key.startswith(n + ".")), None)
        if owner is None or key == f"{owner}.bias":
            tensors[key] = t
    for name, m in qmods.items():
        for local, t in module_tensors(m, schemes[name], amax.get(name)).items():
            tensors[f"{name}.{local}"] = t.detach().cpu().contiguous()
    tensors = dict(sorted(tensors.items()))
    qconfig = quantization_config(schemes, model, ct)

    def fill(tmp: Path) -> None:
        shards = ck._shards(tensors, max_shard_bytes or ck.DEFAULT_SHARD_BYTES)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            ck.write_shard(shard, tmp / fname)
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
        (tmp / ck.INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
        write_config(tmp, {**cfg, "quantization_config": qconfig})
        copy_side_files(model, tmp)

    return write_folder(out, overwrite, fill)
