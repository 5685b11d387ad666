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
