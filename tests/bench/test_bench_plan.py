from __future__ import annotations

from pathlib import Path

import yaml

from bench.models import build_models, layout_mlserver, layout_repository, sha256
from bench.peers import MLServerPeer, OrtPeer, OurServer, PeerOptions
from bench.runner import RunSettings, plan


def test_plan_for_this_server(tmp_path: Path) -> None:
    peer = OurServer(tmp_path, PeerOptions(), tmp_path / "repo", ["tabular", "mlp", "cnn"])
    cells = plan(peer, ["tabular", "mlp", "cnn"], RunSettings(concurrency=(1, 32), py_client_max=8))
    keys = {(c.model, c.path, c.concurrency, c.batching) for c in cells}
    assert ("tabular", "v1-records", 32, False) in keys
    assert not any(c.path == "v1-records" for c in cells if c.model != "tabular")
    assert ("mlp", "v2-json", 64, True) in keys and ("mlp", "v2-json", 64, False) in keys  # batching target
    assert ("cnn", "py-shm", 8, False) in keys and ("cnn", "py-shm", 32, False) not in keys  # capped
    assert all(c.served_as == ("mlp_batched" if c.batching else c.model) for c in cells)


def test_plan_for_mlserver_and_ort(tmp_path: Path) -> None:
    settings = RunSettings(concurrency=(1, 8, 32, 64))
    mls = MLServerPeer(tmp_path, PeerOptions(workers=2), tmp_path, tmp_path / "python", parallel=True)
    assert mls.name == "mlserver-parallel" and mls.parallel_workers == 2
    cells = plan(mls, ["tabular", "cnn"], settings)
    assert {c.path for c in cells} == {"v2-json"} and len(cells) == 8
    ort_cells = plan(OrtPeer(tmp_path, PeerOptions()), ["mlp", "cnn"], settings)
    assert sorted((c.model, c.batch) for c in ort_cells) == [
        ("cnn", 1), ("mlp", 1), ("mlp", 8), ("mlp", 32), ("mlp", 64),
    ]  # fmt: skip


def test_models_file_and_env(tmp_path: Path) -> None:
    peer = OurServer(tmp_path, PeerOptions(workers=3), tmp_path / "repo", ["tabular", "mlp"])
    peer.write_models_file()
    entries = yaml.safe_load(peer.models_file.read_text())["models"]
    assert [e["model_id"] for e in entries] == ["tabular", "mlp", "mlp_batched"]
    assert entries[2]["max_batch_size"] == 64 and entries[2]["max_queue_delay_us"] == 2000
    assert all(e["version"] == "1" for e in entries)
    env = peer.environment()
    assert env["MODEL_SERVER_WORKERS"] == "3" and env["MODEL_SERVER_HOST"] == "127.0.0.1"
    assert env["MODEL_SERVER_ALLOW_CLIENT_SHM"] == "true"
    assert len(env["MODEL_SERVER_RUN_DIR"]) < 40  # ipc:// paths stay short


def test_models_build_deterministically_and_lay_out(tmp_path: Path) -> None:
    first = build_models(tmp_path / "a", ["mlp", "cnn"])
    second = build_models(tmp_path / "b", ["mlp", "cnn"])
    assert all(sha256(first[n]) == sha256(second[n]) for n in first)
    repo = layout_repository(first, tmp_path / "repo")
    assert (repo / "mlp" / "1" / "model.onnx").exists() and (
        repo / "mlp_batched" / "1" / "model.onnx"
    ).exists()
    mls = layout_mlserver(first, tmp_path / "mls")
    settings = yaml.safe_load((mls / "cnn" / "model-settings.json").read_text())
    assert settings["implementation"] == "bench.mlserver_runtime.OnnxRuntimeModel"
    assert settings["parameters"]["uri"] == "./model.onnx"
