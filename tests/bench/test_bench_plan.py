from __future__ import annotations

from pathlib import Path

import yaml

from bench.models import build_models, layout_mlserver, layout_repository, sha256
from bench.more_peers import LitServePeer, PyTritonPeer
from bench.peers import MLServerPeer, OrtPeer, OurServer, Peer, PeerOptions
from bench.pyclient import grpc_layout
from bench.run import PEER_MODELS, RUN_ORDER, parse_args, run_settings
from bench.runner import RunSettings, plan, selected
from bench.stats import Cell

MODELS = ["tabular", "mlp", "cnn"]


def all_peers(tmp_path: Path) -> list[Peer]:
    options = PeerOptions()
    files = {m: tmp_path / f"{m}.onnx" for m in MODELS}
    python = tmp_path / "python"
    return [
        OurServer(tmp_path, options, tmp_path / "repo", MODELS),
        MLServerPeer(tmp_path, options, tmp_path, python, parallel=False),
        MLServerPeer(tmp_path, options, tmp_path, python, parallel=True),
        PyTritonPeer(tmp_path, options, files, python),
        LitServePeer(tmp_path, options, files, python),
        OrtPeer(tmp_path, options),
    ]


def default_plan(tmp_path: Path, settings: RunSettings) -> list[Cell]:
    cells: list[Cell] = []
    for peer in all_peers(tmp_path):
        cells += plan(peer, [m for m in MODELS if m in PEER_MODELS[peer.name]], settings)
    return cells


def test_sweep_plan_for_this_server(tmp_path: Path) -> None:
    peer = OurServer(tmp_path, PeerOptions(), tmp_path / "repo", MODELS)
    cells = plan(peer, MODELS, RunSettings(concurrency=(1, 64), py_client_max=8))
    keys = {(c.model, c.path, c.concurrency, c.batching) for c in cells}
    assert ("tabular", "v1-records", 64, False) in keys
    assert not any(c.path == "v1-records" for c in cells if c.model != "tabular")
    assert ("mlp", "v2-json", 32, True) in keys and ("mlp", "v2-json", 32, False) in keys  # batching target
    assert ("cnn", "py-shm", 8, False) in keys and ("cnn", "py-shm", 64, False) not in keys  # capped
    assert ("tabular", "grpc", 64, False) in keys  # gRPC is not capped: threads carry the concurrency
    assert all(c.served_as == ("mlp_batched" if c.batching else c.model) for c in cells)


def test_sweep_plan_for_mlserver_and_ort(tmp_path: Path) -> None:
    settings = RunSettings(concurrency=(1, 8, 32, 64))
    mls = MLServerPeer(tmp_path, PeerOptions(workers=2), tmp_path, tmp_path / "python", parallel=True)
    assert mls.name == "mlserver-parallel" and mls.parallel_workers == 2
    cells = plan(mls, ["tabular", "cnn"], settings)
    assert {c.path for c in cells} == {"v2-json"} and len(cells) == 8  # gRPC: opt-in for parallel
    in_process = MLServerPeer(tmp_path, PeerOptions(), tmp_path, tmp_path / "python", parallel=False)
    assert {c.path for c in plan(in_process, ["tabular"], settings)} == {"v2-json", "grpc"}
    ort_cells = plan(OrtPeer(tmp_path, PeerOptions()), ["mlp", "cnn"], settings)
    assert sorted((c.model, c.batch) for c in ort_cells) == [("cnn", 1), ("mlp", 1), ("mlp", 32)]


def test_default_plan_has_every_cell_the_targets_need(tmp_path: Path) -> None:
    keys = {
        (c.peer, c.model, c.path, c.concurrency, c.batching) for c in default_plan(tmp_path, RunSettings())
    }
    for peer in ("ours", "mlserver", "mlserver-parallel", "pytriton", "litserve"):
        assert (peer, "tabular", "v2-json", 1, False) in keys
        assert (peer, "tabular", "v2-json", 32, False) in keys
    for batching in (False, True):
        assert ("ours", "mlp", "v2-binary", 32, batching) in keys
    assert ("pytriton", "mlp", "v2-binary", 32, True) in keys  # Triton's dynamic batcher
    assert ("ours", "cnn", "v2-json", 8, False) in keys and ("mlserver", "cnn", "v2-json", 8, False) in keys
    assert ("mlserver", "tabular", "grpc", 32, False) in keys
    assert not any(k[0] == "mlserver-parallel" and k[2] == "grpc" for k in keys)
    assert not any(k[2] == "py-grpc" for k in keys)  # the Python gRPC client only when asked for
    for peer in ("ours", "pytriton"):  # gRPC against REST binary
        assert (peer, "tabular", "grpc", 32, False) in keys and (
            peer,
            "tabular",
            "v2-binary",
            32,
            False,
        ) in keys
    for path in ("v1-records", "v2-json", "v2-binary", "v2-shm", "grpc"):  # frontend CPU per path
        assert ("ours", "tabular", path, 32, False) in keys
    assert ("ort", "mlp", "in-process", 1, False) in keys
    assert RUN_ORDER[-1] == "ours" and set(RUN_ORDER) == set(PEER_MODELS)


def test_default_plan_fits_half_an_hour(tmp_path: Path) -> None:
    settings = run_settings(parse_args([]), tmp_path)
    assert (settings.duration_s, settings.reps) == (10.0, 3)  # medians of 3
    cells = default_plan(tmp_path, settings)
    per_cell = settings.warmup_s + settings.reps * settings.duration_s + 3.0  # + check request, spawn
    peer_start = 60.0  # the slowest start measured here (PyTriton) with margin
    total = len(cells) * per_cell + len(RUN_ORDER) * peer_start
    assert total < 25 * 60, f"{len(cells)} cells, about {total / 60:.0f} min"


def test_only_selects_cells(tmp_path: Path) -> None:
    settings = RunSettings(only=("mlp:v2-binary", "tabular:v2-json:1", "*:grpc"))
    assert selected(settings, "mlp", "v2-binary", 32) and selected(settings, "tabular", "v2-json", 1)
    assert not selected(settings, "tabular", "v2-json", 32) and not selected(settings, "cnn", "v2-json", 8)
    assert selected(settings, "tabular", "grpc", 32)
    assert selected(RunSettings(), "cnn", "v2-json", 8)
    peer = PyTritonPeer(tmp_path, PeerOptions(), {"mlp": tmp_path / "mlp.onnx"}, tmp_path / "python")
    cells = plan(peer, ["mlp"], settings)
    assert [(c.served_as, c.concurrency) for c in cells] == [("mlp", 32), ("mlp_batched", 32)]


def test_py_grpc_and_off_plan_cells_when_named(tmp_path: Path) -> None:
    peer = OurServer(tmp_path, PeerOptions(), tmp_path / "repo", ["tabular"])
    only = RunSettings(
        only=("tabular:grpc:32", "tabular:v2-binary:32", "tabular:py-grpc:32", "tabular:v2-json:8")
    )
    keys = [(c.path, c.concurrency) for c in plan(peer, ["tabular"], only)]
    assert sorted(keys) == [("grpc", 32), ("py-grpc", 32), ("v2-binary", 32), ("v2-json", 8)]
    keys = [(c.path, c.concurrency) for c in plan(peer, ["tabular"], RunSettings(paths=("py-grpc",)))]
    assert keys == [("py-grpc", 32)]  # at the gRPC cell's planned levels
    sweep = RunSettings(concurrency=(1, 8))
    assert "py-grpc" not in {c.path for c in plan(peer, ["tabular"], sweep)}
    parallel = MLServerPeer(tmp_path, PeerOptions(), tmp_path, tmp_path / "python", parallel=True)
    assert [c.path for c in plan(parallel, ["tabular"], RunSettings(only=("*:grpc:32",)))] == ["grpc"]


def test_grpc_layout() -> None:
    assert grpc_layout(32, 8) == (8, 4)
    assert grpc_layout(1, 8) == (1, 1)
    assert grpc_layout(30, 8) == (8, 4)  # rounds up: never fewer calls in flight than asked
    assert grpc_layout(5, 8) == (5, 1)


def test_new_peer_commands(tmp_path: Path) -> None:
    files = {"tabular": tmp_path / "tabular.onnx", "mlp": tmp_path / "mlp.onnx"}
    triton = PyTritonPeer(tmp_path, PeerOptions(workers=2), files, tmp_path / "py")
    command = triton.command()
    assert command[1:3] == ["-m", "bench.pytriton_server"] and "--instances" in command
    assert command[command.index("--instances") + 1] == "2"
    assert f"mlp_batched={files['mlp']}" in command and f"mlp={files['mlp']}" in command
    assert command[command.index("--host") + 1] == "127.0.0.1"
    lit = LitServePeer(tmp_path, PeerOptions(workers=2), {"tabular": files["tabular"]}, tmp_path / "py")
    command = lit.command()
    assert command[command.index("--api-servers") + 1] == "2" and command[-1] == f"tabular={files['tabular']}"
    assert command[command.index("--host") + 1] == "127.0.0.1"


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
    assert "MODEL_SERVER_GRPC_PORT" in env
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
