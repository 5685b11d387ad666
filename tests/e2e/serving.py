"""Helpers of the tests that serve the tiny model with a real registry: uploads, greedy completions, health."""
import time

from tests.helpers import tar_dir

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADMIN = {"Authorization": "Bearer admin-secret"}
GREEDY = {"prompt": "multiplex", "max_tokens": 10, "temperature": 0, "ignore_eos": True}


def upload(server, adapter_id, archive, **form):
    return server.client.post("/admin/adapters", files={"file": ("a.tar.gz", archive)},
                              data={"adapter_id": adapter_id, "public": "true", **form}, headers=ADMIN)


def greedy_text(server, adapter_id, **extra):
    r = server.client.post("/v1/completions", json={**GREEDY, "adapter_id": adapter_id, **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def tiny_checkpoint(data_dir):
    from server.model.config import ModelConfig
    from server.model.tiny import ensure_tiny_checkpoint

    path = ensure_tiny_checkpoint(data_dir / "models" / "tiny")
    return path, ModelConfig.from_dir(path)


def format1_archive(tmp_path, data_dir, name, seed, rank=8):
    from adapters.artifact import save_artifact
    from tests.helpers import random_lowrank

    _, cfg = tiny_checkpoint(data_dir)
    deltas = random_lowrank(cfg, dict.fromkeys(ALL, rank), seed=seed, magnitude=0.6)
    return deltas, tar_dir(save_artifact(tmp_path / name, deltas, method="lora", spec=cfg.spec()))


def wait_for_health(server, status: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (r := server.client.get("/health")).status_code != status:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)
