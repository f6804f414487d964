"""A recording ML-Dash server on 127.0.0.1, for the tests and the benchmark.

It implements the endpoints the real ``ml-dash==0.11.0`` client uses (GraphQL GetProject and
GetExperimentNode, PROJECT/FOLDER/EXPERIMENT nodes as upserts, parameters, logs, metric and
track batches, the status PATCH, files: FOLDER nodes under the experiment's node and a FILE node
as a multipart upload whose checksum must match its bytes, ``PATCH``/``DELETE /api/nodes/{id}``
of a file, GraphQL GetExperimentProject and ListExperimentFilesPaginated) and the reads a
shipper needs (metric stats, logs with a total, track rows in a time range, an experiment's
files), stores what it is sent, and records every request (a multipart body as its form
fields, with the file part under ``"file"``).
Path parameters are one segment each, decoded after splitting, so an unencoded ``train/loss``
misses the route (404), as it does on the real server.

Faults are rules matched against requests (``fail``): answer a status (with ``Retry-After``),
stall, reset the connection, drop it, answer 2xx without a body, or store the request and
then fail, reset or drop. ``honour_idempotency`` makes it answer a repeated
``Idempotency-Key`` with the first answer instead of storing again. ``stop()`` closes every
connection and ``start()`` listens again on the same port with the same store: a restart.

Run as ``python -m tests.fakes.mldash_server [--port N] [--ignore-idempotency]`` it prints
its URL and serves until killed; ``GET /_fake/summary`` then tells what it holds.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import hashlib
import itertools
import re
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import orjson

ACTIONS = ("status", "stall", "reset", "drop", "empty", "store_then_fail", "store_then_reset", "store_then_drop")


@dataclass
class Fault:
    """A rule: requests whose method and path match get ``action`` (``times`` of them; -1: all)."""

    path: str
    action: str = "status"
    status: int = 500
    method: str | None = None
    times: int = 1
    retry_after: str | None = None
    stall_s: float = 0.0
    store_after_stall: bool = True
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and re.search(self.path, path) is not None


@dataclass
class Recorded:
    """One request as the server saw it."""

    t: float
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any
    status: int = 0
    action: str | None = None
    replayed: bool = False


@dataclass
class Experiment:
    """What the server holds of one experiment."""

    id: str
    node: str
    ns: str
    project: str
    folders: list[str]
    name: str
    fields: dict[str, Any]
    status: str = "RUNNING"
    params: dict[str, Any] = field(default_factory=dict)
    logs: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    metric_meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    tracks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    """File node id → ``name``, ``path`` (its folders under the experiment), ``data``, ``checksum``,
    ``contentType``, ``description``, ``tags``, ``metadata``, ``deletedAt``."""

    @property
    def prefix(self) -> str:
        return "/".join([self.ns, self.project, *self.folders, self.name])


class Store:
    """Everything the server holds, behind one lock."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.ids = itertools.count(1_000_001)
        self.projects: dict[tuple[str, str], str] = {}
        self.folders: dict[tuple[str, str, str], str] = {}
        self.folder_names: dict[str, str] = {}
        self.experiments: dict[str, Experiment] = {}
        self.exp_by_key: dict[tuple[str, str, str], str] = {}
        self.nodes: dict[str, str] = {}
        """Experiment node id → experiment id."""
        self.file_nodes: dict[str, str] = {}
        """File node id → experiment id."""
        self.folder_parent: dict[str, str] = {}
        self.missing_namespaces: set[str] = set()

    def new_id(self) -> str:
        return str(next(self.ids))

    def by_prefix(self, prefix: str) -> Experiment | None:
        with self.lock:
            return next((e for e in self.experiments.values() if e.prefix == prefix), None)


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    fake: FakeMlDash


class FakeMlDash:
    """The server; see the module docstring."""

    def __init__(self, *, honour_idempotency: bool = True, tokens: set[str] | None = None, port: int = 0,
                 record_bodies: bool = True) -> None:
        self.honour_idempotency = honour_idempotency
        self.tokens = tokens
        self.port = port
        self.record_bodies = record_bodies
        self.store = Store()
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self.idem: dict[str, tuple[int, bytes]] = {}
        self.idem_busy: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.stalled = 0
        """Requests held by a ``stall`` fault right now (a test kills the client while this is > 0)."""
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    # ---------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeMlDash:
        """Listen (again, on the same port after a ``stop``)."""
        assert self._httpd is None, "already listening"
        self.stopping.clear()
        httpd = _Server(("127.0.0.1", self.port), _Handler)
        httpd.fake = self
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (stalled requests end unanswered)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self.stopping.set()
        httpd.shutdown()
        httpd.server_close()
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> FakeMlDash:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ faults
    def fail(self, path: str, action: str = "status", **kw: Any) -> Fault:
        """Add a fault rule (see ``Fault``); returns it, so a test can read ``hits``."""
        assert action in ACTIONS, action
        f = Fault(path, action, **kw)
        with self.lock:
            self.faults.append(f)
        return f

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def _fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.times != 0 and f.matches(method, path):
                    if f.times > 0:
                        f.times -= 1
                    f.hits += 1
                    return f
        return None

    # ----------------------------------------------------------------- queries
    def calls(self, method: str | None = None, path: str | None = None) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if (method is None or r.method == method)
                    and (path is None or re.search(path, r.path) is not None)]

    def summary(self) -> dict[str, Any]:
        """Counts of what is stored, per experiment prefix (for a server in another process)."""
        with self.store.lock:
            return {
                "requests": len(self.requests),
                "experiments": {e.prefix: {
                    "status": e.status, "params": len(e.params), "logs": len(e.logs),
                    "metrics": {k: len(v) for k, v in e.metrics.items()}, "tracks": {k: len(v) for k, v in e.tracks.items()},
                    "files": len(e.files),
                } for e in self.store.experiments.values()},
            }

    # ---------------------------------------------------------------- handling
    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        """Route a request and apply it to the store; ``(status, JSON answer)``."""
        st = self.store
        parts = [unquote(p) for p in path.split("/")[1:]]
        with st.lock:
            if method == "POST" and parts == ["graphql"]:
                return self._graphql(body)
            if method == "GET" and parts == ["_fake", "summary"]:
                return 200, self.summary()
            if len(parts) < 2 or parts[0] != "api":
                return 404, {"error": "no such route"}
            p = parts[1:]
            if method == "POST" and len(p) == 3 and p[0] == "namespaces" and p[2] == "nodes":
                return self._node(p[1], body)
            if len(p) == 2 and p[0] == "nodes" and p[1] in st.file_nodes:
                return self._file_node(method, p[1], body)
            if method == "PATCH" and len(p) == 2 and p[0] == "nodes":
                eid = st.nodes.get(p[1])
                if eid is None:
                    return 404, {"error": "node not found"}
                st.experiments[eid].status = str(body.get("status"))
                return 200, {"id": p[1], "status": st.experiments[eid].status}
            if len(p) < 3 or p[0] != "experiments":
                return 404, {"error": "no such route"}
            exp = st.experiments.get(p[1])
            if exp is None:
                return 404, {"error": "experiment not found"}
            rest = p[2:]
            if rest == ["parameters"]:
                if method == "POST":
                    exp.params.update(body.get("data") or {})
                return 200, {"experimentId": exp.id, "data": exp.params}
            if rest == ["logs"]:
                if method == "POST":
                    start = len(exp.logs)
                    exp.logs.extend(body["logs"])
                    return 201, {"created": len(body["logs"]), "startSequence": start, "endSequence": len(exp.logs) - 1,
                                 "experimentId": exp.id}
                limit = int(query.get("limit", ["100"])[0])
                offset = int(query.get("offset", ["0"])[0])
                return 200, {"logs": exp.logs[offset:offset + limit], "total": len(exp.logs),
                             "hasMore": offset + limit < len(exp.logs)}
            if len(rest) == 3 and rest[0] == "metrics":
                name, op = rest[1], rest[2]
                points = exp.metrics.get(name, [])
                if method == "GET" and op == "stats":
                    if name not in exp.metrics:
                        return 404, {"error": "metric not found"}
                    return 200, {"name": name, "totalDataPoints": str(len(points)), "bufferedDataPoints": str(len(points)),
                                 "chunkedDataPoints": "0", **exp.metric_meta.get(name, {})}
                if method == "POST" and op in ("append-batch", "append"):
                    new = body["dataPoints"] if op == "append-batch" else [body["data"]]
                    start = len(points)
                    exp.metrics.setdefault(name, []).extend(new)
                    meta = {k: body[k] for k in ("description", "tags", "metadata") if k in body}
                    if meta:
                        exp.metric_meta.setdefault(name, {}).update(meta)
                    return 200, {"metricId": f"{exp.id}:{name}", "startIndex": start, "endIndex": start + len(new) - 1,
                                 "count": len(new)}
            if len(rest) == 3 and rest[0] == "tracks":
                topic, op = rest[1], rest[2]
                if method == "POST" and op == "append_batch":
                    exp.tracks.setdefault(topic, []).extend(body["entries"])
                    return 200, {"count": len(body["entries"])}
                if method == "GET" and op == "data":
                    lo = float(query.get("start_timestamp", ["-inf"])[0])
                    hi = float(query.get("end_timestamp", ["inf"])[0])
                    rows = [e for e in exp.tracks.get(topic, []) if lo <= e["timestamp"] <= hi]
                    return 200, {"topic": topic, "entries": rows}
            return 404, {"error": "no such route"}

    def _graphql(self, body: Any) -> tuple[int, Any]:
        st = self.store
        query = str(body.get("query", ""))
        variables = body.get("variables") or {}
        if "GetProject" in query:
            ns = variables.get("namespace")
            if ns in st.missing_namespaces:
                return 200, {"data": {"namespace": None}}
            projects = [{"id": pid, "slug": slug} for (n, slug), pid in st.projects.items() if n == ns]
            return 200, {"data": {"namespace": {"projects": projects}}}
        if "project(" in query and "nodes(" in query:
            # The real client's GetExperimentNode (by project id) and GetExperimentPath (by slugs).
            slugs = (str(variables.get("namespaceSlug")), str(variables.get("projectSlug")))
            pid = variables.get("projectId") or st.projects.get(slugs)
            return 200, {"data": {"project": {"nodes": self._tree(str(pid), "ROOT")} if pid else None}}
        if "GetExpInfo" in query:
            exp = st.experiments.get(str(variables.get("experimentId")))
            info = {"project": {"slug": exp.project, "namespace": {"slug": exp.ns}}} if exp else None
            return 200, {"data": {"experimentById": info}}
        if "GetExperimentNode" in query:
            exp = st.experiments.get(str(variables.get("experimentId")))
            return 200, {"data": {"experimentNode": {"id": exp.node} if exp else None}}
        if "GetExperimentProject" in query:
            exp = st.experiments.get(str(variables.get("experimentId")))
            if exp is None:
                return 200, {"data": {"experimentById": None}}
            pid = st.projects.get((exp.ns, exp.project))
            return 200, {"data": {"experimentById": {"projectId": pid, "project": {"slug": exp.project, "name": exp.project}}}}
        if "ListExperimentFilesPaginated" in query:
            exp = st.experiments.get(str(variables.get("experimentId")))
            if exp is None:
                return 200, {"data": {"experimentById": None}}
            live = [(nid, f) for nid, f in exp.files.items() if f["deletedAt"] is None]
            offset, limit = int(variables.get("offset", 0)), int(variables.get("limit", 500))
            page = [{"id": nid, "name": f["name"], "description": f["description"], "tags": f["tags"],
                     "metadata": f["metadata"], "createdAt": f["createdAt"], "pPath": f["path"],
                     "physicalFile": {"id": nid, "filename": f["name"], "contentType": f["contentType"],
                                      "sizeBytes": str(len(f["data"])), "checksum": f["checksum"], "s3Url": None}}
                    for nid, f in live[offset:offset + limit]]
            return 200, {"data": {"experimentById": {"filesPaginated": {
                "files": page, "totalCount": len(live), "hasMore": offset + limit < len(live)}}}}
        return 200, {"errors": [{"message": "unknown query"}]}

    def _tree(self, pid: str, parent: str) -> list[dict[str, Any]]:
        """A project's nodes under ``parent``: folders and experiments, each with its children."""
        st = self.store
        out: list[dict[str, Any]] = []
        for (p, par, name), nid in st.folders.items():
            if p == pid and par == parent:
                out.append({"id": nid, "name": name, "type": "FOLDER", "experimentId": None, "parentId": parent,
                            "children": self._tree(pid, nid)})
        for (p, par, name), eid in st.exp_by_key.items():
            if p == pid and par == parent:
                node = st.experiments[eid].node
                out.append({"id": node, "name": name, "type": "EXPERIMENT", "experimentId": eid, "parentId": parent,
                            "children": self._tree(pid, node)})
        return out

    def _node(self, ns: str, body: Any) -> tuple[int, Any]:
        st = self.store
        kind = body.get("type")
        if kind == "PROJECT":
            key = (ns, str(body["slug"]))
            new = key not in st.projects
            if new:
                st.projects[key] = st.new_id()
            return (201 if new else 200), {"project": {"id": st.projects[key], "slug": key[1]}, "node": {"id": st.projects[key]}}
        if kind == "FOLDER":
            fkey = (str(body["projectId"]), str(body["parentId"]), str(body["name"]))
            new = fkey not in st.folders
            if new:
                st.folders[fkey] = st.new_id()
                st.folder_names[st.folders[fkey]] = fkey[2]
                st.folder_parent[st.folders[fkey]] = fkey[1]
            return (201 if new else 200), {"node": {"id": st.folders[fkey], "type": "FOLDER", "name": fkey[2]}}
        if kind == "EXPERIMENT":
            if "projectId" in body:
                pid = str(body["projectId"])
                slug = next((s for (n, s), i in st.projects.items() if i == pid), None)
                if slug is None:
                    return 400, {"error": "unknown projectId"}
            else:
                slug = str(body["projectSlug"])
                pid = st.projects.setdefault((ns, slug), st.new_id())
            parent = str(body.get("parentId"))
            ekey = (pid, parent, str(body["name"]))
            eid = st.exp_by_key.get(ekey)
            if eid is None:
                folders: list[str] = []
                node = parent
                while node != "ROOT" and node in st.folder_names:
                    folders.insert(0, st.folder_names[node])
                    node = next(k[1] for k, v in st.folders.items() if v == node)
                eid, nid = st.new_id(), st.new_id()
                st.experiments[eid] = Experiment(eid, nid, ns, slug, folders, str(body["name"]), dict(body))
                st.exp_by_key[ekey] = eid
                st.nodes[nid] = eid
                status = 201
            else:
                status = 200
            exp = st.experiments[eid]
            return status, {"experiment": {"id": exp.id, "name": exp.name}, "node": {"id": exp.node}, "project": {"id": pid}}
        if kind == "FILE":
            return self._new_file(body)
        return 400, {"error": f"unknown node type {kind!r}"}

    def _new_file(self, body: Any) -> tuple[int, Any]:
        """A multipart FILE node: under the experiment's node or a folder below it."""
        st = self.store
        exp = st.experiments.get(str(body.get("experimentId")))
        part = body.get("file")
        if exp is None:
            return 404, {"error": "experiment not found"}
        if not isinstance(part, dict) or not body.get("name") or not body.get("checksum"):
            return 400, {"error": "a FILE node needs name, checksum and a file part"}
        data = part["data"]
        if hashlib.sha256(data).hexdigest() != body["checksum"]:
            return 400, {"error": "checksum does not match the uploaded bytes"}
        path: list[str] = []
        node = str(body.get("parentId"))
        while node != exp.node:
            if node not in st.folder_names:
                return 400, {"error": f"parent {node} is neither the experiment's node nor a folder under it"}
            path.insert(0, st.folder_names[node])
            node = st.folder_parent[node]
        nid = st.new_id()
        tags = [t for t in str(body.get("tags") or "").split(",") if t]
        exp.files[nid] = {"name": body["name"], "path": "/".join(path), "data": data, "checksum": body["checksum"],
                          "contentType": part["content_type"], "description": body.get("description"), "tags": tags,
                          "metadata": orjson.loads(body["metadata"]) if body.get("metadata") else None,
                          "createdAt": time.time(), "deletedAt": None}
        st.file_nodes[nid] = exp.id
        return 201, {"node": {"id": nid, "type": "FILE", "name": body["name"], "parentId": body.get("parentId"),
                              "experimentId": exp.id},
                     "physicalFile": {"id": nid, "filename": body["name"], "contentType": part["content_type"],
                                      "sizeBytes": str(len(data)), "checksum": body["checksum"]}}

    def _file_node(self, method: str, nid: str, body: Any) -> tuple[int, Any]:
        """``PATCH`` (description, tags, metadata), ``DELETE`` (soft) or ``GET`` of a file node."""
        f = self.store.experiments[self.store.file_nodes[nid]].files[nid]
        if method == "DELETE":
            if f["deletedAt"] is not None:
                return 404, {"error": "file not found"}
            f["deletedAt"] = time.time()
            return 200, {"id": nid, "deletedAt": f["deletedAt"]}
        if method == "PATCH" and isinstance(body, dict):
            f.update({k: body[k] for k in ("description", "tags", "metadata") if k in body})
        return 200, {"id": nid, "name": f["name"], "description": f["description"], "tags": f["tags"],
                     "metadata": f["metadata"]}


def _form(content_type: str, raw: bytes) -> dict[str, Any]:
    """A ``multipart/form-data`` body as its fields; the file part as ``{"filename", "content_type", "data"}``."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
    out: dict[str, Any] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True)
        if part.get_filename() is not None:
            out[str(name)] = {"filename": part.get_filename(), "content_type": part.get_content_type(), "data": data}
        else:
            out[str(name)] = data.decode() if isinstance(data, bytes) else data
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.fake.lock:
            self.server.fake._conns.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        with self.server.fake.lock:
            self.server.fake._conns.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read ``requests``."""

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _reset(self) -> None:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        try:
            self.connection.close()
        except OSError:
            pass

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _serve(self, method: str) -> None:
        fake = self.server.fake
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        ctype = self.headers.get("Content-Type") or ""
        try:
            body = _form(ctype, raw) if ctype.startswith("multipart/form-data") else orjson.loads(raw) if raw else None
        except (orjson.JSONDecodeError, ValueError):
            body = None
        wanted = ("authorization", "idempotency-key", "content-type")
        headers = {k.lower(): v for k, v in self.headers.items() if k.lower() in wanted}
        rec = Recorded(time.time(), method, url.path, parse_qs(url.query), headers, body if fake.record_bodies else None)
        with fake.lock:
            fake.requests.append(rec)
        if fake.tokens is not None and headers.get("authorization", "").removeprefix("Bearer ") not in fake.tokens:
            rec.status = 401
            self._answer(401, b'{"error":"invalid or missing token"}')
            return
        if raw and body is None:
            rec.status = 400
            self._answer(400, b'{"error":"body is not JSON"}')
            return
        fault = fake._fault(method, url.path)
        rec.action = fault.action if fault else None
        if fault is not None and fault.action == "status":
            rec.status = fault.status
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            self._answer(fault.status, orjson.dumps({"error": f"injected {fault.status}"}), extra)
            return
        if fault is not None and fault.action in ("reset", "drop"):
            self._reset() if fault.action == "reset" else self._drop()
            return
        if fault is not None and fault.action == "stall":
            with fake.lock:
                fake.stalled += 1
            fake.stopping.wait(fault.stall_s)
            with fake.lock:
                fake.stalled -= 1
            if not fault.store_after_stall:
                self._drop()
                return
        key = headers.get("idempotency-key") if method in ("POST", "PATCH") else None
        status, answer = self._apply(fake, key, method, url.path, rec.query, body, rec)
        rec.status = status
        action = fault.action if fault else None
        if action == "empty":
            self._answer(200, b"")
        elif action == "store_then_fail":
            rec.status = 500
            self._answer(500, b'{"error":"injected after storing"}')
        elif action in ("store_then_reset", "store_then_drop"):
            self._reset() if action == "store_then_reset" else self._drop()
        else:
            self._answer(status, answer)

    def _apply(self, fake: FakeMlDash, key: str | None, method: str, path: str, query: dict[str, list[str]], body: Any,
               rec: Recorded) -> tuple[int, bytes]:
        if key is None or not fake.honour_idempotency:
            status, answer = fake.handle(method, path, query, body)
            return status, orjson.dumps(answer)
        while True:
            with fake.lock:
                if key in fake.idem:
                    rec.replayed = True
                    return fake.idem[key]
                busy = fake.idem_busy.get(key)
                if busy is None:
                    fake.idem_busy[key] = threading.Event()
                    break
            busy.wait(30)
        try:
            status, answer = fake.handle(method, path, query, body)
            out = (status, orjson.dumps(answer))
            if 200 <= status < 300:
                with fake.lock:
                    fake.idem[key] = out
            return out
        finally:
            with fake.lock:
                fake.idem_busy.pop(key).set()


def main() -> None:
    ap = argparse.ArgumentParser(description="A recording ML-Dash server on 127.0.0.1 (for benchmarks).")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ignore-idempotency", action="store_true")
    args = ap.parse_args()
    fake = FakeMlDash(honour_idempotency=not args.ignore_idempotency, port=args.port, record_bodies=False)
    fake.start()
    sys.stdout.write(fake.url + "\n")
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
