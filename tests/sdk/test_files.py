"""``exp.files``: ML-Dash's documented file examples through the real agent, and what dashcar adds.

Each test checks the run's ``files/`` as ML-Dash lays it out (index entries, bytes, checksums)
and, where it matters, reads it back with ``ml_dash``'s own local reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import dashcar
from dashcar.proto import FILE_INLINE_MAX_BYTES
from tests.conftest import AgentHandle, read_json, wait_until

ENTRY_KEYS = [
    "id", "experimentId", "path", "filename", "description", "tags", "bindrs", "contentType", "sizeBytes", "checksum",
    "metadata", "uploadedAt", "updatedAt", "deletedAt",
]


def index(run: Path) -> list[dict[str, Any]]:
    doc = json.loads((run / "files" / ".files_metadata.json").read_text())
    assert list(doc) == ["files"]
    entries: list[dict[str, Any]] = doc["files"]
    return entries


def stored(run: Path, entry: dict[str, Any]) -> Path:
    return run.joinpath("files", *[p for p in entry["path"].split("/") if p], entry["id"], entry["filename"])


def check_index(run: Path) -> list[dict[str, Any]]:
    """Every entry has ML-Dash's keys in its order, and its stored bytes match size and checksum."""
    entries = index(run)
    for e in entries:
        assert list(e) == ENTRY_KEYS
        data = stored(run, e).read_bytes()
        assert len(data) == e["sizeBytes"] and hashlib.sha256(data).hexdigest() == e["checksum"], e
        assert e["uploadedAt"].endswith("Z") and e["id"].isdigit()
    ids = [e["id"] for e in entries]
    assert len(ids) == len(set(ids))
    wait_until(lambda: not (run / "files" / ".incoming").exists(), 20, "spool files released once every sink passed them")
    on_disk = {p.parent.name for p in (run / "files").rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert on_disk == set(ids), "no id directory without its entry (overwritten ones are removed)"
    assert not list((run / "files").rglob("*.partial"))
    return entries


def live(run: Path) -> dict[str, dict[str, Any]]:
    return {(e["path"].rstrip("/") + "/" + e["filename"]).lstrip("/"): e for e in index(run) if e["deletedAt"] is None}


def test_the_documented_file_examples(agent: AgentHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The examples of ML-Dash 0.11's ``FileBuilder``/``FilesAccessor`` docstrings, as written there."""
    monkeypatch.chdir(tmp_path)
    Path("local_model.pt").write_bytes(b"weights" * 10)
    Path("model.pt").write_bytes(os.urandom(200_000))
    Path("checkpoint.pt").write_bytes(b"ckpt")
    for i in range(3):
        Path(f"img{i}.png").write_bytes(bytes([i]) * 100)
    with dashcar.Experiment(prefix="alice/files/docs", dash_root=agent.data_dir, echo_logs=False).run as dxp:
        dxp.files("models").upload("./local_model.pt")
        dxp.files("checkpoints").upload("./model.pt", to="latest.pt")
        dxp.files("checkpoints").upload("./checkpoint.pt", to="epoch_10.pt", description="Best model at epoch 10",
                                        tags=["best", "training"])
        dxp.files(dir="configs").save_json({"lr": 0.001}, to="config.json")
        dxp.files(dir="data").save_blob(b"binary data", to="data.bin")
        dxp.files.save_text("content", to="view.yaml")
        dxp.files.save_json(dict(hey="yo"), to="config.json")
        dxp.files.upload("./model.pt", to="models/model.pt")
        dxp.files.upload("./model.pt", to="best.pt", description="Best model")
        for i in range(3):
            dxp.files("images").upload(f"img{i}.png")
        assert dxp.files("checkpoints/epoch_10.pt").download(to="dl.pt") == "dl.pt"
        result = dxp.files(
            file_id=live(dxp.run_dir)["checkpoints/epoch_10.pt"]["id"],
            description="Updated description", tags=["new", "tags"], metadata={"updated": True},
        ).update()
        assert result["description"] == "Updated description"
        assert [f["filename"] for f in dxp.files("images").list("*.png")] == ["img0.png", "img1.png", "img2.png"]
        assert len(dxp.files(dir="models").list()) == 2 and len(dxp.files().list()) == 12
        assert dxp.files("configs/config.json").download() == "config.json"
        assert Path("config.json").read_text() == '{\n  "lr": 0.001\n}'
        paths = dxp.files("images").download("*.png", to="./local_images")
        assert sorted(Path(p).read_bytes() for p in paths) == [bytes([i]) * 100 for i in range(3)]
        assert dxp.files.download("images/*.png", to="local_images2") and len(os.listdir("local_images2")) == 3
        assert dxp.files("config.json").exists() and not dxp.files("nothing.txt").exists()
        assert json.loads(dxp.files("config.json").read_text()) == {"hey": "yo"}
        assert dxp.files("view.yaml").read_text() == "content"
        snapshot = dxp.files("models").save_blob(os.urandom(70_000), to="model_00005.pt")
        dxp.files().duplicate(snapshot, to="models/latest.pt")
        dxp.files("data.bin").delete()
        dxp.files.delete("images/*.png")
        with pytest.raises(ValueError, match="File not found"):
            dxp.files("data.bin").delete()
        assert Path("local_model.pt").exists() and Path("model.pt").exists(), "the caller's files stay"
        run = dxp.run_dir
    entries = check_index(run)
    files = live(run)
    assert sorted(files) == sorted([
        "models/local_model.pt", "checkpoints/latest.pt", "checkpoints/epoch_10.pt", "configs/config.json", "view.yaml",
        "config.json", "models/model.pt", "best.pt", "models/model_00005.pt", "models/latest.pt",
    ])
    assert Path("dl.pt").read_bytes() == b"ckpt"
    epoch = files["checkpoints/epoch_10.pt"]
    assert (epoch["description"], epoch["tags"], epoch["metadata"]) == ("Updated description", ["new", "tags"], {"updated": True})
    assert files["models/latest.pt"]["checksum"] == files["models/model_00005.pt"]["checksum"]
    assert files["checkpoints/latest.pt"]["sizeBytes"] == 200_000
    assert {e["filename"] for e in entries if e["deletedAt"]} == {"data.bin", "img0.png", "img1.png", "img2.png"}
    assert all(e["experimentId"] == "files/alice/files/docs" for e in entries)
    ml_dash = pytest.importorskip("ml_dash")
    with ml_dash.Experiment(prefix="alice/files/docs", dash_root=str(agent.data_dir)).run as theirs:
        listed = {(f["path"], f["filename"]) for f in theirs.files().list()}
        assert listed == {(e["path"], e["filename"]) for e in files.values()}
        theirs.files("checkpoints/latest.pt").download(to="theirs.pt")
        assert Path("theirs.pt").read_bytes() == Path("model.pt").read_bytes()


def test_save_helpers_store_what_ml_dash_would(agent: AgentHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pickle, image (PNG and JPEG), figure, video (GIF with imageio), torch (a stand-in module), and spool sizes."""
    np = pytest.importorskip("numpy")
    monkeypatch.chdir(tmp_path)
    torch_stub = tmp_path / "stub" / "torch.py"
    torch_stub.parent.mkdir()
    torch_stub.write_text("import pickle\ndef save(obj, path):\n    with open(path, 'wb') as f:\n        pickle.dump(obj, f)\n")
    monkeypatch.syspath_prepend(str(torch_stub.parent))
    frames = np.linspace(0, 1, 4 * 16 * 16 * 3).reshape(4, 16, 16, 3)
    with dashcar.Experiment(prefix="alice/files/helpers", dash_root=agent.data_dir, echo_logs=False).run as exp:
        exp.files("data").save_pkl({"a": [1, 2]}, to="obj.pkl")
        exp.files("frames").save_image(np.arange(64, dtype=np.uint8).reshape(8, 8), to="f.png")
        exp.files("frames").save_image(np.ones((8, 8, 4)), to="sub/f.jpg")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.plot([1, 2, 3], [1, 4, 9])
        exp.files("plots").save_fig(to="plot.png", dpi=50)
        pytest.importorskip("imageio")
        exp.files("videos").save_video(frames, to="v.gif", fps=10)
        state = {"w": list(range(20_000))}
        exp.files("models").save_torch(state, to="ckpt/model.pt")
        big = exp.files("data").save_blob(os.urandom(FILE_INLINE_MAX_BYTES + 1), to="big.bin")
        small = exp.files("data").save_blob(bytes(FILE_INLINE_MAX_BYTES), to="small.bin")
        with pytest.raises(ValueError, match="'to' parameter is required"):
            exp.files("x").save(b"bytes")
        exp.files("x").save([1, 2], to="list.json")
        run = exp.run_dir
    files = live(run)
    check_index(run)
    assert pickle.loads(stored(run, files["data/obj.pkl"]).read_bytes()) == {"a": [1, 2]}
    assert pickle.loads(stored(run, files["models/ckpt/model.pt"]).read_bytes()) == state, "a directory in to is kept"
    assert stored(run, files["frames/f.png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stored(run, files["frames/sub/f.jpg"]).read_bytes()[:3] == b"\xff\xd8\xff"
    assert files["plots/plot.png"]["contentType"] == "image/png" and stored(run, files["plots/plot.png"]).stat().st_size > 0
    assert stored(run, files["videos/v.gif"]).read_bytes()[:6] == b"GIF89a"
    assert json.loads(stored(run, files["x/list.json"]).read_text()) == [1, 2]
    assert (big["sizeBytes"], small["sizeBytes"]) == (FILE_INLINE_MAX_BYTES + 1, FILE_INLINE_MAX_BYTES)
    assert big["checksum"] is None and big["status"] == "queued"


def test_video_without_imageio_is_a_clear_error(agent: AgentHandle, tmp_path: Path) -> None:
    code = f"""
        import sys
        sys.modules["imageio"] = None
        sys.modules["imageio.v3"] = None
        import dashcar
        with dashcar.Experiment(prefix="alice/files/novideo", dash_root={str(agent.data_dir)!r}).run as exp:
            try:
                exp.files("v").save_video([[0]], to="v.mp4")
            except ImportError as exc:
                print("error:", exc)
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=agent.env(), capture_output=True, text=True,
                         timeout=60)
    assert "error: save_video needs imageio: pip install imageio imageio-ffmpeg" in res.stdout, res.stderr


def _stopped(agent: AgentHandle) -> list[int]:
    pids = agent.pids()
    agent.signal_all(signal.SIGSTOP, pids)
    return pids


def test_a_file_changed_after_the_call(agent: AgentHandle, tmp_path: Path) -> None:
    """Small files are read at the call (a later change cannot reach them); a large one is copied by the
    agent, which stores what it read with that checksum and counts the change; a vanished one is a counted loss."""
    small, large, gone = tmp_path / "small.txt", tmp_path / "large.bin", tmp_path / "gone.bin"
    small.write_bytes(b"v1")
    large.write_bytes(b"1" * 100_000)
    gone.write_bytes(b"2" * 100_000)
    exp = dashcar.Experiment(prefix="alice/files/changed", dash_root=agent.data_dir, echo_logs=False).start()
    assert exp.flush()
    pids = _stopped(agent)
    try:
        exp.files("a").upload(small)
        exp.files("a").upload(large)
        exp.files("a").upload(gone)
        small.write_bytes(b"v2")
        large.write_bytes(b"3" * 150_000)
        gone.unlink()
    finally:
        agent.signal_all(signal.SIGCONT, pids)
    exp.complete()
    run = exp.run_dir
    files = live(run)
    check_index(run)
    assert stored(run, files["a/small.txt"]).read_bytes() == b"v1"
    assert stored(run, files["a/large.bin"]).read_bytes() == b"3" * 150_000
    assert "a/gone.bin" not in files
    counters = read_json(run / "experiment.json")["dashcar"]["counters"]
    assert counters["files_changed_after_call"] == 1
    assert counters["files_lost"] == 1 and counters["files_lost_vanished"] == 1
    assert counters["files_stored"] == 2


def test_params_land_within_a_merge_window_without_a_flush(agent_factory: Any) -> None:
    """``parameters.json`` is written after the core step that saw ``params.set``, not at flush or close."""
    agent = agent_factory("--merge-window-s", "60").start()
    exp = dashcar.Experiment(prefix="alice/files/params", dash_root=agent.data_dir, echo_logs=False).start()
    exp.tracks("t").append(x=1, _ts=0.0)
    exp.params.set(lr=0.1, model={"depth": 4})
    doc = wait_until(lambda: read_json(exp.run_dir / "parameters.json"), 20, "parameters.json while the run goes on")
    assert doc["data"] == {"lr": 0.1, "model.depth": 4}
    assert not (exp.run_dir / "tracks" / "t" / "data.jsonl").exists(), "the track row still waits for its merge window"
    exp.params.set(lr=0.2)
    wait_until(lambda: (read_json(exp.run_dir / "parameters.json") or {}).get("data", {}).get("lr") == 0.2, 20, "update")
    assert read_json(exp.run_dir / "experiment.json")["status"] == "running"
    exp.complete()


def test_a_remote_only_run_keeps_no_local_files_and_its_spool_goes_once_passed(agent: AgentHandle) -> None:
    """``RunItem.local`` false: the JSONL sink writes nothing; a spool file is released once every sink passed it."""
    import msgpack
    import zmq

    from dashcar.proto import INGEST_SOCKET, PROTOCOL_VERSION, Kind

    root, prefix = str(agent.data_dir), "alice/files/remote"
    run = agent.data_dir / "alice" / "files" / "remote"
    spool = run / "files" / ".incoming"
    spool.mkdir(parents=True)
    (spool / "7").write_bytes(b"s" * 100_000)

    def frame(seq: int, kind: int, payload: object) -> bytes:
        return msgpack.packb([PROTOCOL_VERSION, kind, 9, os.getpid(), root, prefix, seq, payload])

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(f"ipc://{agent.runtime_dir / INGEST_SOCKET}")
    for raw in (
        frame(1, Kind.RUN_OPEN, {"name": "remote", "local": False}),
        frame(2, Kind.FILE_PUT, ["6", "/a", "inline.txt", ["inline", b"hi"], {"time": 1.0}]),
        frame(3, Kind.FILE_PUT, ["7", "/a", "big.bin", ["spool", "7"], {"time": 1.0, "size": 100_000}]),
        frame(4, Kind.RUN_CLOSE, ["completed", None, 0]),
    ):
        sock.send(raw)
    sock.close()
    ctx.term()
    wait_until(lambda: agent.status()["frames"]["written"] >= 2 and not (spool / "7").exists(), 20, "spool released")
    agent.flush()
    assert not (run / "experiment.json").exists() and not (run / "files" / ".files_metadata.json").exists()
    assert not [p for p in run.rglob("*") if p.is_file()], "no local file of a remote-only run"
