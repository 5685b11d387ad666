"""`multiplex train --model tiny` resolves the embedded backbone and writes an artifact the server accepts."""
import json

from server.cli import main


def test_multiplex_train_on_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTIPLEX_DATA_DIR", str(tmp_path / "data"))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}:", "completion": f" {i}{i}"}) + "\n" for i in range(24)))
    out = tmp_path / "out"
    assert main(["train", "--method", "lora", "--model", "tiny", "--data", str(data), "--out", str(out),
                 "--max-steps", "3", "--rank", "2", "--batch-size", "4"]) == 0
    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["method"] == "lora" and manifest["base"]["architecture"] == "llama"

    from adapters.artifact import load_adapter
    from server.model.config import ModelConfig

    spec = ModelConfig.from_dir(tmp_path / "data" / "models" / "tiny").spec()
    loaded = load_adapter(out, spec)  # validates against the tiny backbone, fingerprint included
    assert loaded.deltas.lowrank and all(lr.rank == 2 for lr in loaded.deltas.lowrank.values())
