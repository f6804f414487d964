"""A run's files shipped to an ML-Dash server by the real agent: puts, duplicates, updates, deletes, faults, kills.

The server is the recording ML-Dash server of ``tests/fakes`` on 127.0.0.1; it checks every
upload's checksum against its bytes and files each under the folders it was sent to. The
assertions compare what the server holds with the run's local index, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AgentHandle, run_producer, wait_until
from tests.e2e.dash_common import FAST, TOKEN, flush_remote, holding, server
from tests.fakes.mldash_server import Experiment, FakeMlDash


def on_server(e: Experiment) -> dict[tuple[str, str], dict[str, Any]]:
    """The experiment's live files by (directory, name)."""
    out = {}
    for f in e.files.values():
        if f["deletedAt"] is None:
            assert (f["path"], f["name"]) not in out, f"{f['path']}/{f['name']} twice on the server"
            out[(f["path"], f["name"])] = f
    return out


def local_index(run: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The run's live local index entries by (directory without its leading slash, name)."""
    entries = json.loads((run / "files" / ".files_metadata.json").read_text())["files"]
    return {(e["path"].strip("/"), e["filename"]): e for e in entries if e["deletedAt"] is None}


def test_every_file_operation_of_a_run_reaches_the_server_as_the_local_index_has_it(
    agent_factory: Any, fakes: list[FakeMlDash], dirs: Path
) -> None:
    fake = server(fakes)
    agent: AgentHandle = agent_factory(*FAST).start()
    big = dirs / "model.pt"
    big.write_bytes(bytes(range(256)) * 4096)  # 1 MiB: cloned into the spool, or handed over by path
    prefix = "alice/files/2026/run"
    run_producer(
        f"""
        import dashcar
        with dashcar.Experiment(prefix={prefix!r}, dash_url={fake.url!r}, dash_root={str(agent.data_dir)!r},
                                echo_logs=False).run as exp:
            exp.files("models").upload({str(big)!r}, description="epoch 1", tags=["ckpt", "best"], metadata={{"epoch": 1}})
            exp.files("configs").save_json({{"lr": 0.1, "layers": [64, 64]}}, to="config.json")
            exp.files("notes").save_text("hello\\n", to="deep/er/readme.txt")
            exp.files().save_blob(bytes(200_000), to="zeros.bin")
            exp.files("tmp").save_text("scratch", to="scratch.txt")
            latest = exp.files("models").list()[0]
            exp.files().duplicate(latest, to="models/latest.pt")
            exp.files(file_id=latest["id"], description="epoch 1, kept", tags=["ckpt"]).update()
            exp.files("tmp/scratch.txt").delete()
        """,
        {**agent.env(), "DASHCAR_DASH_TOKEN": TOKEN},
    )
    e = wait_until(lambda: holding(fake, prefix), 30, "the run complete on the server")
    run = agent.data_dir / prefix
    local = local_index(run)
    held = on_server(e)
    assert set(held) == set(local) == {
        ("models", "model.pt"), ("models", "latest.pt"), ("configs", "config.json"), ("notes/deep/er", "readme.txt"),
        ("", "zeros.bin"),
    }
    for key, entry in local.items():
        f = held[key]
        stored = run / "files" / key[0] / entry["id"] / key[1]
        assert f["data"] == stored.read_bytes(), key
        assert f["checksum"] == entry["checksum"] == hashlib.sha256(f["data"]).hexdigest()
        assert (f["description"], f["tags"], f["metadata"]) == (entry["description"], entry["tags"], entry["metadata"]), key
    assert held[("models", "model.pt")]["data"] == big.read_bytes()
    assert held[("models", "latest.pt")]["data"] == big.read_bytes()
    assert (held[("models", "model.pt")]["description"], held[("models", "model.pt")]["tags"]) == ("epoch 1, kept", ["ckpt"])
    assert [f["name"] for f in e.files.values() if f["deletedAt"] is not None] == ["scratch.txt"]

    uploads = fake.calls("POST", "/nodes$")
    files = [r for r in uploads if r.body.get("type") == "FILE"]
    assert len(files) == 6 and all(r.headers["content-type"].startswith("multipart/form-data; boundary=") for r in files)
    assert all(r.body["experimentId"] == e.id and r.body["projectId"] for r in files)
    folders = [r.body for r in uploads if r.body.get("type") == "FOLDER" and r.body.get("experimentId") == e.id]
    assert sorted(b["name"] for b in folders) == ["configs", "deep", "er", "models", "notes", "tmp"], "each folder once"
    status = fake.calls("PATCH", f"/api/nodes/{e.node}$")
    assert len(status) == 1 and status[0].t >= max(r.t for r in fake.requests if r is not status[0]), "status last"
    st = agent.status()["sinks"]["dash"]["remote"]["counters"]
    assert st["files_shipped"] == 6 and st["file_bytes"] == sum(len(f["data"]) for f in e.files.values())
    assert not list((agent.state_dir / "dash-files").iterdir()), "no kept bytes left once the server has them"


def test_a_remote_only_run_ships_small_and_path_handed_files_and_loses_a_vanished_one_visibly(
    agent_factory: Any, fakes: list[FakeMlDash], dirs: Path
) -> None:
    fake = server(fakes)
    agent: AgentHandle = agent_factory(*FAST).start()
    keep, gone = dirs / "weights.bin", dirs / "gone.bin"
    keep.write_bytes(b"w" * 300_000)
    gone.write_bytes(b"g" * 300_000)
    prefix = "alice/remote-files/run"
    res = run_producer(
        f"""
        import os, dashcar
        exp = dashcar.Experiment(prefix={prefix!r}, dash_url={fake.url!r}, dash_root=None, echo_logs=False)
        with exp.run:
            exp.files("cfg").save_json({{"a": 1}}, to="a.json")
            exp.files("w").upload({str(keep)!r})
            exp.files("w").upload({str(gone)!r})
            os.unlink({str(gone)!r})
            try:
                exp.files().save_blob(bytes(100_000), to="big.bin")
            except dashcar.ConfigError as err:
                print("big:", err)
        """,
        {**agent.env(), "DASHCAR_DASH_TOKEN": TOKEN},
    )
    assert res.stdout.startswith("big: run 'alice/remote-files/run' keeps no local files"), res.stdout
    e = wait_until(lambda: holding(fake, prefix), 30, "the run complete on the server")
    held = on_server(e)
    assert set(held) == {("cfg", "a.json"), ("w", "weights.bin")}
    assert held[("w", "weights.bin")]["data"] == keep.read_bytes()
    counters = agent.status()["sinks"]["dash"]["remote"]["counters"]
    assert counters["files_lost"] == counters["files_lost_vanished"] == 1
    assert "gone.bin" in agent.log() and "vanished" in agent.log()
    assert not agent.data_dir.exists()


@pytest.mark.parametrize("fault", ["store_then_drop", "stall"])
def test_an_unanswered_upload_is_read_back_not_sent_twice_even_across_an_agent_sigkill(
    agent_factory: Any, fakes: list[FakeMlDash], dirs: Path, fault: str
) -> None:
    """The server ignores ``Idempotency-Key``: only the read-back keeps a file once. ``store_then_drop``
    stores the upload and cuts the connection; ``stall`` holds it while the agent is SIGKILLed."""
    fake = server(fakes, honour_idempotency=False)
    agent: AgentHandle = agent_factory(*FAST, "--dash-timeout-s", "1").start()
    src = dirs / "ckpt.pt"
    src.write_bytes(b"c" * 500_000)
    prefix = "alice/unanswered/run"
    run_producer(
        f"""
        import dashcar
        with dashcar.Experiment(prefix={prefix!r}, dash_url={fake.url!r}, dash_root={str(agent.data_dir)!r},
                                echo_logs=False).run as exp:
            exp.files("models").save_text("v1", to="first.txt")
        """,
        {**agent.env(), "DASHCAR_DASH_TOKEN": TOKEN},
    )
    wait_until(lambda: holding(fake, prefix), 30, "the run and its models/ folder exist on the server")
    # From here on, every POST to the nodes route is a file upload.
    uploads = r"/api/namespaces/alice/nodes$"
    if fault == "stall":
        rule = fake.fail(uploads, "stall", method="POST", stall_s=1.5, times=-1)
    else:
        rule = fake.fail(uploads, "store_then_drop", method="POST", times=2)
    run_producer(
        f"""
        import dashcar
        with dashcar.Experiment(prefix={prefix!r}, dash_url={fake.url!r}, dash_root={str(agent.data_dir)!r},
                                echo_logs=False).run as exp:
            exp.files("models").upload({str(src)!r})
            exp.files("models").save_text("v2", to="notes.txt")
        """,
        {**agent.env(), "DASHCAR_DASH_TOKEN": TOKEN},
    )
    if fault == "stall":
        wait_until(lambda: fake.stalled > 0 and any(r.body and r.body.get("type") == "FILE" for r in fake.requests),
                   20, "an upload held by the server")
        agent.kill()
        rule.times = 0
        agent.start()
    assert flush_remote(agent, 30)
    e = fake.store.by_prefix(prefix)
    assert e is not None
    held = on_server(e)
    assert set(held) == {("models", "first.txt"), ("models", "ckpt.pt"), ("models", "notes.txt")}
    assert held[("models", "ckpt.pt")]["data"] == src.read_bytes()
    assert len(e.files) == 3, "each file once on the server"
    assert rule.hits == (2 if fault == "store_then_drop" else 1)
    reads = [r for r in fake.calls("POST", "/graphql$") if "ListExperimentFilesPaginated" in r.body["query"]]
    assert reads, "the agent read back the experiment's files before sending again"


def test_a_refused_upload_goes_to_a_dead_letter_and_the_other_files_and_the_status_go_on(
    agent_factory: Any, fakes: list[FakeMlDash], dirs: Path
) -> None:
    fake = server(fakes)
    agent: AgentHandle = agent_factory(*FAST).start()
    prefix = "alice/refused/run"
    run_producer(
        f"""
        import dashcar
        with dashcar.Experiment(prefix={prefix!r}, dash_url={fake.url!r}, dash_root={str(agent.data_dir)!r},
                                echo_logs=False).run as exp:
            exp.metrics("m").log(i=0)
        """,
        {**agent.env(), "DASHCAR_DASH_TOKEN": TOKEN},
    )
    wait_until(lambda: holding(fake, prefix), 30, "the run exists on the server")
    rule = fake.fail(r"/api/namespaces/alice/nodes$", "status", status=413, method="POST", times=1)
    run_producer(
        f"""
        import dashcar
        with dashcar.Experiment(prefix={prefix!r}, dash_url={fake.url!r}, dash_root={str(agent.data_dir)!r},
                                echo_logs=False).run as exp:
            exp.files().save_text("too big, says the server", to="a.txt")
            exp.files().save_text("fine", to="b.txt")
        """,
        {**agent.env(), "DASHCAR_DASH_TOKEN": TOKEN},
    )
    assert flush_remote(agent, 20)
    e = fake.store.by_prefix(prefix)
    assert e is not None and rule.hits == 1
    assert set(on_server(e)) == {("", "b.txt")}
    dead = [json.loads(line) for line in (agent.state_dir / "deadletter" / "dash.jsonl").read_text().splitlines()]
    assert len(dead) == 1 and "413" in dead[0]["reason"]
    assert dead[0]["item"]["filename"] == "a.txt" and dead[0]["item"]["op"] == "put"
    assert dead[0]["item"]["meta"]["checksum"] == hashlib.sha256(b"too big, says the server").hexdigest()
    assert TOKEN not in (agent.state_dir / "deadletter" / "dash.jsonl").read_text()
    assert not list((agent.state_dir / "dash-files").iterdir())


FILES_SCRIPT = """
import os, sys
if sys.argv[1] == "ml_dash":
    from ml_dash import Experiment
    kw = {}
else:
    from dashcar import Experiment
    kw = {"echo_logs": False}
with Experiment(prefix="alice/robotics/2026/files-run", dash_url=os.environ["URL"], dash_root=None, **kw).run as exp:
    exp.files("models").upload(os.environ["BIG"], description="epoch 1", tags=["ckpt", "best"], metadata={"epoch": 1})
    exp.files("configs").save_json({"lr": 0.1, "layers": [64, 64]}, to="config.json")
    exp.files("notes").save_text("hello", to="deep/er/readme.txt")
    exp.files().save_blob(b"\\x00\\x01" * 1000, to="raw.bin")
"""


def test_the_same_file_calls_through_ml_dash_and_through_dashcar_leave_the_server_the_same_files(
    agent_factory: Any, fakes: list[FakeMlDash], dirs: Path
) -> None:
    """Compared: each file's folders under the experiment, name, bytes, checksum, content type, description,
    tags and metadata as the server stored them, and the FOLDER chain each client created."""
    import os
    import subprocess
    import sys

    theirs, ours = server(fakes), server(fakes)
    config = dirs / "mldash-config"
    config.mkdir()
    (config / "tokens.json").write_text(json.dumps({"ml-dash-token": TOKEN}))
    big = dirs / "model.pt"
    big.write_bytes(bytes(range(256)) * 1024)
    env = {**os.environ, "ML_DASH_NO_VERSION_CHECK": "1", "ML_DASH_CONFIG_DIR": str(config), "BIG": str(big)}
    script = dirs / "script.py"
    script.write_text(FILES_SCRIPT)
    ref = subprocess.run([sys.executable, str(script), "ml_dash"], env={**env, "URL": theirs.url}, capture_output=True,
                         text=True, timeout=60, cwd=dirs)
    assert ref.returncode == 0, ref.stderr
    assert not big.exists(), "ml_dash deletes an uploaded file that lives under the temp dir (a bug dashcar does not copy)"
    big.write_bytes(bytes(range(256)) * 1024)
    agent: AgentHandle = agent_factory(*FAST).start()
    res = subprocess.run([sys.executable, str(script), "dashcar"], env={**agent.env(), **env, "URL": ours.url},
                         capture_output=True, text=True, timeout=60, cwd=dirs)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res
    assert flush_remote(agent, 15)
    assert big.exists()

    def files(fake: FakeMlDash) -> dict[tuple[str, str], tuple[Any, ...]]:
        e = fake.store.by_prefix("alice/robotics/2026/files-run")
        assert e is not None
        return {k: (f["data"], f["checksum"], f["contentType"], f["description"], f["tags"], f["metadata"])
                for k, f in on_server(e).items()}

    def folders(fake: FakeMlDash) -> list[tuple[Any, ...]]:
        return sorted((r.body["name"], "experimentId" in r.body) for r in fake.calls("POST", "/nodes$")
                      if r.body.get("type") == "FOLDER")

    a, b = files(theirs), files(ours)
    assert set(a) == {("models", "model.pt"), ("configs", "config.json"), ("notes/deep/er", "readme.txt"), ("", "raw.bin")}
    assert a == b
    assert folders(theirs) == folders(ours)
