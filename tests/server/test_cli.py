"""`multiplex serve` / `train` refuse to start, by name, where Hugging Face's `kernels` package is installed: its
import name is our kernels/ package's, and transformers would fail on our package with an ImportError that does not
say why (transformers >= 5.25 requires it: README, Next steps)."""
import importlib.metadata

import pytest

from server.cli import kernels_name_clash, main


def test_serve_and_train_refuse_to_start_beside_hugging_faces_kernels_package(monkeypatch, capsys):
    assert kernels_name_clash() is None  # this environment (pyproject pins transformers below 5.25)
    version = importlib.metadata.version

    def with_hf_kernels(name):
        return "0.19.1" if name == "kernels" else version(name)

    monkeypatch.setattr(importlib.metadata, "version", with_hf_kernels)
    for argv in (["serve", "--model", "tiny"], ["train", "--help"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"multiplex {argv[0]}: Hugging Face's `kernels` package (0.19.1) is installed" in err
        assert "pip uninstall kernels" in err
    with pytest.raises(SystemExit) as done:  # a client command does not import transformers: not refused
        main(["adapters", "--help"])
    assert done.value.code == 0


def test_lora_dtype_is_a_setting_named_by_its_flag_when_wrong(monkeypatch):
    from server.config import ConfigError, load_settings
    from server.engine.builder import build_engine_options

    monkeypatch.delenv("MULTIPLEX_LORA_DTYPE", raising=False)
    assert load_settings(model="tiny", device="cpu").lora_dtype == "auto"
    settings = load_settings(model="tiny", device="cpu", lora_dtype="BF16")
    assert settings.lora_dtype == "bfloat16" and build_engine_options(settings).lora_dtype == "bfloat16"
    assert load_settings(model="tiny", device="cpu", lora_dtype="fp32").lora_dtype == "float32"
    with pytest.raises(ConfigError, match=r"--lora-dtype / MULTIPLEX_LORA_DTYPE: unknown lora_dtype 'float16'"):
        load_settings(model="tiny", device="cpu", lora_dtype="float16")
