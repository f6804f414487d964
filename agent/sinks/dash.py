"""The ML-Dash sink: runs → an ML-Dash server over HTTP, each point once, through outages and crashes.

A run ships to its own server (``Experiment(dash_url=...)``) or to the agent's (``dash_url``);
other runs cost this sink one look at their ``RunItem``. The calls are those of the ``ml-dash``
0.11 client (``docs/remote.md``): ``POST /graphql`` GetProject, the PROJECT/FOLDER/EXPERIMENT nodes,
then parameters, logs (≤ 100 a request), metric points (≤ 1000) and track rows (≤ 1000 and
≤ 4 MiB), files (a FOLDER node per directory under the experiment's node, then the bytes as a
multipart FILE node; ``PATCH`` / ``DELETE /api/nodes/{id}`` for an update or a delete), and the
status ``PATCH`` last, once everything else of the run was acknowledged.

Layout of the state (this sink's namespace of the state environment, committed by the runner
with the cursor, so what a send staged exists durably exactly when its batch was passed)
- ``r:<run>``: the run's server, token, prefix, server ids (project, folders, experiment,
  node), whether this agent created the experiment, the status still to send.
- ``s:<series>``: a series (params, logs, a metric, a topic) of a run: its backlog's size and
  oldest batch, and for logs and metrics the count the server holds (``expect``).
- ``q:<series><batch u64><n u32>``: the outbox, each entry some units (points, rows, log
  lines, one params change, one file operation) already encoded as JSON, in stream order per series.
- ``<state dir>/dash-files/<blob>``: a file's bytes from the moment its put is staged until the
  server holds them (the spool file or the caller's file may be gone by then); written and
  fsynced before the staging commits, deleted once the acknowledgement is committed. A blob no
  outbox entry names (a send that failed before its commit) is swept at start.
- ``<state dir>/dash-deadline``: the latest deadline of the requests sent, written before each
  request goes (the state is committed only after it): a restarted agent reads back nothing
  before its predecessor's requests must have ended, however large an upload was.

Invariants
- A series has at most one request in flight and sends its outbox in order; requests are
  built only from committed entries, and a series whose acknowledgement is staged waits for
  the commit, so nothing acknowledged is sent again by this process.
- Series are independent: each has its own backoff; a refused request is dead-lettered (with
  its reason, through the runner) and the series goes on. A run's status waits for all of it.
- Exactly once on the server: every write carries an ``Idempotency-Key`` derived from its
  series and stream range (and content). After an ambiguous outcome (timeout, reset or drop
  after sending, 5xx, 2xx without JSON), and for every series with a backlog after a restart
  or a failed commit, the sink reads back what the server holds before it sends again: the
  count of a metric (``…/stats``) or of the logs, the rows of a topic in the time range of the
  head request, the experiment's files (a file of the same name and checksum that no other
  upload of this sink made); what the server has is dropped from the outbox. This assumes the agent is the
  only writer of the series it ships; after a timeout the read-back waits one more request
  timeout, so a server still working on the request has finished it.
- Errors: no connection → the server backs off (one probe at a time, exponential with
  jitter up to ``dash_retry_max_s``); 5xx, 429, timeouts → the series backs off, at least as
  long as ``Retry-After`` says, whatever its size; 401/403 park everything that uses that
  token on that server until the token changes (a run's newer token, or the token file);
  other 4xx → dead letter. The backlog stays in the state meanwhile, up to a quarter of
  ``wal_max_bytes``; past that ``send`` raises ``SinkRetryable`` (back-pressure) and the
  WAL's skip rule takes over, counted per run.
- A token lives in this 0600 state and the WAL only: never in a log line, a status answer,
  a dead letter or a run's files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote, urlsplit

import orjson

from dashcar.proto import file_dir_parts, stored_file_path

from .. import files as kept_files
from .. import layout, merge
from ..book import iso
from ..errors import SinkRetryable
from ..stream import FileItem, FlushedItem, Item, ItemKind, LogsItem, MetaItem, ParamsItem, PointsItem, RowsItem, RunItem
from . import Rejected, WhenFull
from .http import Outcome, Pool, Reply, Request, classify, describe, retry_after_s
from .runner import backoff

if TYPE_CHECKING:
    from ..config import AgentConfig
    from ..stream import Batch
    from ..wal import SinkState

log = logging.getLogger(__name__)

UNNAMED_METRIC: Final = "(default)"
"""Server name of the unnamed metric (``exp.metrics.log(epoch=...)``); ML-Dash 0.11 sends ``None``."""
LOG_BATCH: Final = 100
METRIC_BATCH: Final = 1000
TRACK_BATCH: Final = 1000
PARAMS_BATCH: Final = 100
MAX_BODY_BYTES: Final = 4 << 20
WORKERS: Final = 4
MAX_IN_FLIGHT: Final = 8
HEAD_ENTRIES: Final = 256
BACKOFF_BASE_S: Final = 0.2
TOKEN_CHECK_S: Final = 1.0
RELIEVE_S: Final = 2.0
"""With the outbox full, a send waits this long for the server to take some before it pushes back."""
REPLY_WAIT_S: Final = 0.02
MAX_CLOSED_RUNS: Final = 10_000
STATUS: Final = {"completed": "COMPLETED", "failed": "FAILED", "cancelled": "CANCELLED", "crashed": "FAILED"}
GET_PROJECT: Final = "query GetProject($namespace: String!) { namespace(slug: $namespace) { projects { id slug } } }"
GET_NODE: Final = "query GetExperimentNode($experimentId: ID!) { experimentNode(experimentId: $experimentId) { id } }"
GET_EXP_PROJECT: Final = "query GetExperimentProject($experimentId: ID!) { experimentById(id: $experimentId) { projectId } }"
LIST_FILES: Final = (
    "query ListExperimentFilesPaginated($experimentId: ID!, $limit: Int!, $offset: Int!) { experimentById(id: $experimentId) "
    "{ filesPaginated(limit: $limit, offset: $offset) { files { id name physicalFile { checksum } } totalCount hasMore } } }"
)
LIST_FILES_PAGE: Final = 500
UPLOAD_MIN_BYTES_PER_S: Final = 1 << 20
"""A file upload's deadline is the request timeout plus its size at this rate (1 MiB/s)."""
FILE_FIELDS: Final = ("description", "tags", "metadata")

PARAMS, LOGS, METRIC, TRACK, FILES = "p", "l", "m", "t", "f"
COUNTED: Final = (LOGS, METRIC)
"""Series read back by count; tracks are read back by their rows, params are an idempotent upsert."""

_Entry = tuple[bytes, list[Any]]
"""An outbox entry: its key (without ``q:``) and ``[units, created, first, last, json]``."""


def _q(value: object) -> str:
    return quote(str(value), safe="")


def _finite(value: Any) -> tuple[Any, int]:
    """``value`` with NaN and ±Inf replaced by None, and how many were."""
    if type(value) is float:
        return (value, 0) if math.isfinite(value) else (None, 1)
    if isinstance(value, dict):
        n = 0
        out: dict[Any, Any] = {}
        for k, v in value.items():
            out[k], m = _finite(v)
            n += m
        return out, n
    if isinstance(value, list):
        n = 0
        items = []
        for v in value:
            c, m = _finite(v)
            items.append(c)
            n += m
        return items, n
    return value, 0


def encode(value: Any) -> tuple[bytes, int]:
    """JSON for ``value`` as a server takes it: NaN and ±Inf become null (counted, the second value)."""
    try:
        out = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
        if b"null" not in out:
            return out, 0
    except orjson.JSONEncodeError:
        pass
    clean, n = _finite(value)
    try:
        return orjson.dumps(clean, option=orjson.OPT_NON_STR_KEYS), n
    except orjson.JSONEncodeError:
        return json.dumps(clean, allow_nan=False, default=str).encode(), n


def split_prefix(prefix: str) -> tuple[str, str, list[str], str]:
    """``(namespace, project, folders, name)`` of a run prefix, as ML-Dash 0.11 reads it."""
    parts = prefix.strip("/").split("/")
    ns = parts[0]
    project = parts[1] if len(parts) > 1 else parts[0]
    name = parts[-1] if len(parts) > 2 else project
    return ns, project, parts[2:-1] if len(parts) > 3 else [], name


class Multipart:
    """A ``multipart/form-data`` body (RFC 7578) of text fields and one file part, streamed from
    disk in 1 MiB chunks: a checkpoint of any size goes without being read into memory at once
    (``http.client`` sends an iterable body chunk by chunk)."""

    def __init__(self, fields: dict[str, str], part: str, filename: str, content_type: str, path: str, size: int) -> None:
        self.boundary = "dashcar-" + os.urandom(16).hex()
        head = b"".join(
            self._header(name) + b"\r\n\r\n" + value.encode() + b"\r\n" for name, value in fields.items()
        )
        self.head = head + self._header(part, filename) + f"\r\nContent-Type: {content_type}\r\n\r\n".encode()
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()
        self.path, self.size = path, size

    def _header(self, name: str, filename: str | None = None) -> bytes:
        disposition = f'form-data; name="{_param(name)}"' + (f'; filename="{_param(filename)}"' if filename is not None else "")
        return f"--{self.boundary}\r\nContent-Disposition: {disposition}".encode()

    @property
    def content_type(self) -> str:
        """The request's ``Content-Type`` header."""
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return len(self.head) + self.size + len(self.tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        with open(self.path, "rb") as f:
            while chunk := f.read(kept_files.CHUNK):
                yield chunk
        yield self.tail


def _param(value: str) -> str:
    """A form-data parameter value as browsers write it (a quote or a line break percent-encoded)."""
    return value.replace("\r", "%0D").replace("\n", "%0A").replace('"', "%22")


def public_url(url: str) -> str:
    """A server URL fit for status and logs (without user info)."""
    p = urlsplit(url)
    return f"{p.scheme}://{p.hostname or ''}{f':{p.port}' if p.port else ''}{p.path}"


def _fp(token: str | None) -> str:
    return hashlib.blake2b((token or "").encode(), digest_size=8).hexdigest() if token else "-"


@dataclass(slots=True)
class RunRec:
    """A run shipping to a server; persisted as ``r:<path>``."""

    path: str
    url: str
    prefix: str
    token: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    checked: bool = False
    """GetProject was answered (``project_id`` is then the project's id, or None if there is none)."""
    project_id: str | None = None
    folder_ids: list[str] = field(default_factory=list)
    eid: str | None = None
    nid: str | None = None
    created: bool = False
    status: str | None = None
    final_seq: int = 0
    done: bool = False
    refused: str | None = None
    nonfinite: int = 0
    closed: int = 0
    files: dict[str, list[Any]] = field(default_factory=dict)
    """File id → ``[path, filename, node id on the server or None, content type]``."""
    folders: dict[str, str] = field(default_factory=dict)
    """A file directory (``/models/best``) → its FOLDER node's id."""
    file_counts: dict[str, int] = field(default_factory=dict)
    # in memory only
    busy: bool = False
    next_at: float = 0.0
    attempt: int = 0
    error: str | None = None

    def to_state(self) -> dict[str, Any]:
        """The stored form."""
        return {
            "url": self.url, "prefix": self.prefix, "token": self.token, "info": self.info, "checked": self.checked,
            "project_id": self.project_id, "folder_ids": self.folder_ids, "eid": self.eid, "nid": self.nid,
            "created": self.created, "status": self.status, "final_seq": self.final_seq, "done": self.done,
            "refused": self.refused, "nonfinite": self.nonfinite, "closed": self.closed, "files": self.files,
            "folders": self.folders, "file_counts": self.file_counts,
        }

    @classmethod
    def from_state(cls, path: str, st: dict[str, Any]) -> RunRec:
        """A run from its stored form."""
        return cls(path, **st)


@dataclass(slots=True)
class Series:
    """One series of a run; persisted as ``s:<sid>``."""

    sid: bytes
    run: str
    kind: str
    name: str
    units: int = 0
    size: int = 0
    head_seq: int = 0
    head_created: float = 0.0
    expect: int | None = None
    meta: dict[str, Any] | None = None
    meta_pending: bool = False
    # in memory only
    staged: int = 0
    staged_head: tuple[int, float] | None = None
    verify: bool = False
    busy: bool = False
    dirty: bool = False
    next_at: float = 0.0
    attempt: int = 0
    error: str | None = None

    def to_state(self) -> list[Any]:
        """The stored form."""
        return [self.run, self.kind, self.name, self.units, self.size, self.head_seq, self.head_created, self.expect,
                self.meta, self.meta_pending]

    @classmethod
    def from_state(cls, sid: bytes, st: list[Any]) -> Series:
        """A series from its stored form."""
        return cls(sid, *st)


@dataclass(slots=True)
class Server:
    """What the sink knows of one server (in memory)."""

    url: str
    next_at: float = 0.0
    attempt: int = 0
    error: str | None = None
    parked: dict[str, str] = field(default_factory=dict)
    """Token fingerprint → why the server refused it."""
    probing: bool = False
    """While it is unreachable, one request at a time finds out whether it is back."""
    warned_plain: bool = False


@dataclass(slots=True)
class Job:
    """A request in flight and what its reply applies to."""

    gen: int
    what: str
    """``data``, ``check`` (read-back), ``setup``, ``node`` (GetExperimentNode) or ``status``."""
    run: str
    sid: bytes = b""
    entries: list[_Entry] = field(default_factory=list)
    units: int = 0
    meta: bool = False
    step: str = ""
    method: str = ""
    path: str = ""
    timeout_s: float = 0.0
    url: str = ""
    ref: str = ""
    """A file request's FOLDER path or file id."""


def series_id(run: str, kind: str, name: str) -> bytes:
    """A series' key: 8 bytes of a hash of its run, kind and name."""
    return hashlib.blake2b(f"{run}\0{kind}\0{name}".encode("utf-8", "surrogatepass"), digest_size=8).digest()


class DashSink:
    """Ships runs to ML-Dash servers; see the module docstring."""

    name = "dash"
    when_full: WhenFull = "skip"
    barrier = False

    def __init__(self, cfg: AgentConfig | None = None) -> None:
        self.cfg_url = (cfg.dash_url if cfg else "").rstrip("/")
        self.token_file = cfg.dash_token_file if cfg else ""
        self.timeout_s = cfg.dash_timeout_s if cfg else 30.0
        self.retry_max_s = cfg.dash_retry_max_s if cfg else 30.0
        self.max_bytes = max(1 << 20, (cfg.wal_max_bytes if cfg else 16 << 30) // 4)
        self.blob_dir = str(cfg.state_dir / "dash-files") if cfg else ""
        self._trash: list[str] = []
        self.runs: dict[str, RunRec] = {}
        self.active: set[str] = set()
        self.series: dict[bytes, Series] = {}
        self.servers: dict[str, Server] = {}
        self.units = 0
        self.size = 0
        self.counters: dict[str, int] = {}
        self.nonfinite_by_run: dict[str, int] = {}
        self.refused_runs: dict[str, str] = {}
        self.jobs: dict[int, Job] = {}
        self.pool: Pool | None = None
        self._next_job = 0
        self._gen = 0
        self._loaded = False
        self._clean = False
        self._touched_runs: set[str] = set()
        self._touched_series: set[bytes] = set()
        self._refusals: list[tuple[Job, str]] = []
        self._rotate = 0
        self._file_token: str | None = None
        self._token_stat: tuple[int, int, int] | None = None
        self._token_checked = 0.0
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] = {}
        self._delivered = 1 << 62
        self.deadline_path = str(cfg.state_dir / "dash-deadline") if cfg else ""
        self._deadline = 0.0
        self._deadline_fd: int | None = None
        self._counters_saved: dict[str, int] = {}
        self._backlog: tuple[int, int, float | None] = (0, 0, None)

    # ---------------------------------------------------------------- loading
    def open(self, state: SinkState) -> None:
        """Load runs and series (unless memory already matches what is committed); mark backlogs for read-back."""
        if self._loaded and self._clean:
            return
        self._gen += 1
        first = not self._loaded
        self.runs = {k[2:].decode(): RunRec.from_state(k[2:].decode(), v) for k, v in state.items(b"r:")}
        self.active = {p for p, r in self.runs.items() if not r.done}
        self.nonfinite_by_run = {p: r.nonfinite for p, r in self.runs.items() if r.nonfinite}
        self.refused_runs = {p: r.refused for p, r in self.runs.items() if r.refused}
        self.series = {k[2:]: Series.from_state(k[2:], v) for k, v in state.items(b"s:")}
        self.counters = dict(state.get(b"k:", {}))
        self._counters_saved = dict(self.counters)
        # Requests the previous agent sent just before it died may still be on the server's side:
        # read back only once they must have ended (the latest deadline it recorded before sending).
        resume = time.monotonic() + max(0.0, self._previous_deadline() + 1.0 - time.time()) if first else 0.0
        self.units = sum(s.units for s in self.series.values())
        self.size = sum(s.size for s in self.series.values())
        busy = {j.sid for j in self.jobs.values() if j.sid}
        busy_runs = {j.run for j in self.jobs.values() if not j.sid}
        for s in self.series.values():
            s.verify = s.units > 0 and s.kind != PARAMS
            s.busy = s.sid in busy
            if s.units:
                s.next_at = max(s.next_at, resume)
        for path in busy_runs:
            if path in self.runs:
                self.runs[path].busy = True
        self._trash = []
        if first:
            self._sweep_blobs(state)
        self._refusals = []
        self._touched_runs, self._touched_series = set(), set()
        self._loaded = self._clean = True
        self._publish()

    # ---------------------------------------------------------------- sending
    def send(self, batches: list[Batch], state: SinkState) -> list[Rejected]:
        """Stage the batches' items in the outbox, apply replies, dispatch requests; refused requests come back."""
        self._clean = False
        now = time.monotonic()
        self._check_token_file(now)
        pool = self.pool
        if not batches and pool is not None and pool.in_flight and not pool.ready() and not self._dispatchable(now):
            # Called only to collect replies: wait for one here rather than have the runner call again at once.
            pool.wait(REPLY_WAIT_S)
        self._collect(state)
        if batches and self.size >= self.max_bytes:
            self._relieve(state)
            if self.size >= self.max_bytes:
                self._stage_touched(state)
                state.commit()
                self._settled()
                self._publish()
                raise SinkRetryable(
                    f"outbox full ({self.size} bytes of {self.max_bytes}): waiting for the server to take it", retry_after_s=1.0
                )
        rejected: list[Rejected] = []
        for batch in batches:
            self._stage_batch(batch, state, rejected)
        rejected.extend(self._take_refusals(state))
        self._dispatch(state, time.monotonic())
        self._stage_touched(state)
        self._publish()
        return rejected

    def committed(self, batches: list[Batch]) -> None:
        """What was staged is durable: acknowledged series may send again."""
        self._settled()

    def _sweep_blobs(self, state: SinkState) -> None:
        """Delete file bytes no outbox entry names (kept by a send whose commit never came)."""
        try:
            names = os.listdir(self.blob_dir)
        except FileNotFoundError:
            return
        wanted = set()
        for s in self.series.values():
            if s.kind == FILES and s.units:
                for _, v in state.items(b"q:" + s.sid):
                    wanted.add(orjson.loads(v[4]).get("blob"))
        for name in names:
            if name not in wanted:
                try:
                    os.unlink(os.path.join(self.blob_dir, name))
                except OSError as exc:
                    log.warning("dash: cannot delete %s: %s", name, exc.strerror)

    def _settled(self) -> None:
        for sid in self._touched_series:
            s = self.series.get(sid)
            if s is not None:
                s.staged = 0
                s.staged_head = None
                s.dirty = False
        self._touched_series.clear()
        self._touched_runs.clear()
        self._clean = True
        for name in self._trash:
            try:
                os.unlink(os.path.join(self.blob_dir, name))
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("dash: cannot delete %s: %s", name, exc.strerror)
        self._trash = []

    def _stage_touched(self, state: SinkState) -> None:
        if self.counters != self._counters_saved:
            state.put(b"k:", self.counters)
            self._counters_saved = dict(self.counters)
        for sid in self._touched_series:
            s = self.series.get(sid)
            if s is None:
                state.delete(b"s:" + sid)
            else:
                state.put(b"s:" + sid, s.to_state())
        for path in self._touched_runs:
            rec = self.runs.get(path)
            if rec is None:
                state.delete(b"r:" + path.encode())
            else:
                state.put(b"r:" + path.encode(), rec.to_state())

    def _relieve(self, state: SinkState) -> None:
        """The outbox is full: give the server up to ``RELIEVE_S`` to take some of it."""
        deadline = time.monotonic() + RELIEVE_S
        while self.size >= self.max_bytes and (left := deadline - time.monotonic()) > 0:
            self._dispatch(state, time.monotonic())
            if self.pool is None or not self.pool.in_flight:
                return
            self.pool.wait(min(left, 0.1))
            self._collect(state)
            if any(s.dirty for s in self.series.values()):
                self._stage_touched(state)
                state.commit()
                self._settled()

    def pending(self) -> float | None:
        """Seconds until the sink wants a ``send([])``: replies to apply, requests due, a token to re-read."""
        if self._refusals:
            return 0.0
        pool = self.pool
        if pool is not None and pool.in_flight:
            return 0.0
        if not self.active:
            return None
        now = time.monotonic()
        due = self._next_due(now)
        return None if due is None else max(0.0, due - now)

    def delivered(self) -> int:
        """The last stream batch all of which the servers hold (status sent for runs that ended)."""
        return self._delivered

    def backlog(self) -> tuple[int, int, float | None]:
        """Units (points, rows, log lines, params changes) and bytes in the outbox, and the oldest one's time."""
        return self._backlog

    def close(self) -> None:
        """Let the HTTP threads go; whatever is unsent stays in the state for the next start."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self._deadline_fd is not None:
            os.close(self._deadline_fd)
            self._deadline_fd = None

    # ---------------------------------------------------------------- staging
    def _stage_batch(self, batch: Batch, state: SinkState, rejected: list[Rejected]) -> None:
        ordinal = 0
        recs: dict[str, RunRec | None] = {}
        for item in batch.items:
            if isinstance(item, RunItem):
                recs[item.run] = self._run_item(item, batch.seq)
                continue
            if isinstance(item, FlushedItem):
                continue
            rec = recs.get(item.run)
            if rec is None:
                if item.run in recs:
                    continue
                rec = self.runs.get(item.run)
                if rec is None or rec.done:
                    continue
            if rec.refused:
                rejected.append(Rejected(rec.refused, [item]))
                continue
            for kind, name, units, first, last, data in self._entries(item, rec):
                s = self._series(rec, kind, name)
                key = s.sid + batch.seq.to_bytes(8, "big") + ordinal.to_bytes(4, "big")
                ordinal += 1
                state.put(b"q:" + key, [units, batch.created, first, last, data])
                if s.units == 0:
                    s.head_seq, s.head_created = batch.seq, batch.created
                if s.staged_head is None:
                    s.staged_head = (batch.seq, batch.created)
                s.units += units
                s.staged += units
                s.size += len(data)
                self.units += units
                self.size += len(data)
                self._touched_series.add(s.sid)

    def _entries(self, item: Item, rec: RunRec) -> list[tuple[str, str, int, Any, Any, bytes]]:
        """An item as outbox entries ``(kind, name, units, first, last, json)``, each a request at most."""
        out: list[tuple[str, str, int, Any, Any, bytes]] = []
        if isinstance(item, PointsItem):
            name = item.name if item.name is not None else UNNAMED_METRIC
            points = item.points
            for i in range(0, len(points), METRIC_BATCH):
                chunk = points[i:i + METRIC_BATCH]
                data = self._encode(rec, chunk)[1:-1]
                out.append((METRIC, name, len(chunk), item.first_index + i, 0, data))
        elif isinstance(item, RowsItem):
            rows = item.rows
            assert rows is not None, "the runner hands over materialized rows"
            stamps = item.stamps
            # The local files' lines are the entries the server takes: encoded once for both.
            encoded = layout.track_lines(stamps, rows).split(b"\n")[:-1]
            for i in range(0, len(rows), TRACK_BATCH):
                data = b",".join(encoded[i:i + TRACK_BATCH])
                n = min(TRACK_BATCH, len(rows) - i)
                if len(encoded) != len(rows) or len(data) > MAX_BODY_BYTES or b"NaN" in data or b"Infinity" in data:
                    chunk = [{"timestamp": ts, **r} for ts, r in zip(stamps[i:i + n], rows[i:i + n], strict=True)]
                    self._track_chunks(rec, item.topic, chunk, out)
                else:
                    out.append((TRACK, item.topic, n, stamps[i], stamps[i + n - 1], data))
        elif isinstance(item, LogsItem):
            lines = []
            for t, level, message, metadata in item.entries:
                line: dict[str, Any] = {"timestamp": iso(t), "level": level, "message": message}
                if metadata:
                    line["metadata"] = metadata
                lines.append(line)
            for i in range(0, len(lines), LOG_BATCH):
                chunk = lines[i:i + LOG_BATCH]
                out.append((LOGS, "", len(chunk), item.first_seq + i, 0, self._encode(rec, chunk)[1:-1]))
        elif isinstance(item, ParamsItem):
            if item.changed:
                out.append((PARAMS, "", 1, item.version, 0, self._encode(rec, item.changed)))
        elif isinstance(item, FileItem):
            entry = self._file_entry(item, rec)
            if entry is not None:
                out.append((FILES, "", 1, 0, 0, entry))
        elif isinstance(item, MetaItem) and item.target in ("metric", "series"):
            s = self._series(rec, METRIC, item.name if item.name is not None else UNNAMED_METRIC)
            s.meta = {**(s.meta or {}), **{k: v for k, v in item.info.items() if k in ("description", "tags", "metadata")}}
            s.meta_pending = True
            self._touched_series.add(s.sid)
        return out

    def _file_entry(self, item: FileItem, rec: RunRec) -> bytes | None:
        """A file operation as an outbox entry. A put's (or a copy's) bytes are kept in the blob dir
        first: the spool file goes once every sink passed the batch, the caller's file may change."""
        if item.op == "update":
            fields = {k: item.meta[k] for k in FILE_FIELDS if k in item.meta}
            return self._encode(rec, {"op": "update", "id": item.id, "fields": fields})
        if item.op == "delete":
            return orjson.dumps({"op": "delete", "id": item.id})
        blob = hashlib.blake2b(f"{rec.path}\0{item.id}".encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        dest = os.path.join(self.blob_dir, blob)
        ctype = item.meta.get("content_type")
        try:
            if not self.blob_dir:
                raise kept_files.FileLost("unreadable", "the sink has no state dir to keep file bytes in")
            if item.op == "copy":
                src_id = item.source[1]
                source = self._copy_source(rec, src_id)
                if source is None:
                    raise kept_files.FileLost("no_source", f"file {src_id} to duplicate is no longer at hand")
                ctype = ctype or rec.files[src_id][3]
                kept = kept_files.store_copy(source, dest)
            else:
                kept = kept_files.store_put(item.source, dest, item.meta.get("size"), item.pid)
        except kept_files.FileLost as lost:
            self._count_file(rec, "files_lost")
            self._count_file(rec, "files_lost_" + lost.reason)
            log.warning("dash: run=%s file=%s/%s id=%s lost reason=%s", rec.path, item.path, item.filename, item.id, lost)
            return None
        except OSError as exc:
            raise SinkRetryable(f"keeping file {item.filename} of run {rec.path} for the server failed: {exc}") from exc
        if kept.changed:
            self._count_file(rec, "files_changed_after_call")
        ctype = ctype or kept_files.DEFAULT_CONTENT_TYPE
        rec.files[item.id] = [item.path, item.filename, None, ctype]
        self._touched_runs.add(rec.path)
        entry = {"op": "put", "id": item.id, "path": item.path, "filename": item.filename, "blob": blob, "size": kept.size,
                 "checksum": kept.checksum, "content_type": ctype,
                 **{k: item.meta[k] for k in FILE_FIELDS if item.meta.get(k) is not None}}
        return self._encode(rec, entry)

    def _copy_source(self, rec: RunRec, src_id: str) -> str | None:
        """Where a duplicate's bytes are: the source's blob while it waits for the server, else the run's
        local copy (a run without local files whose source was already uploaded has none)."""
        src = rec.files.get(src_id)
        if src is None:
            return None
        blob = os.path.join(self.blob_dir, hashlib.blake2b(f"{rec.path}\0{src_id}".encode("utf-8", "surrogatepass"),
                                                           digest_size=16).hexdigest())
        if os.path.exists(blob):
            return blob
        local = stored_file_path(rec.path, src[0], src_id, src[1])
        return local if os.path.exists(local) else None

    def _count_file(self, rec: RunRec, name: str, n: int = 1) -> None:
        rec.file_counts[name] = rec.file_counts.get(name, 0) + n
        self.counters[name] = self.counters.get(name, 0) + n
        self._touched_runs.add(rec.path)

    def _track_chunks(self, rec: RunRec, topic: str, entries: list[dict[str, Any]],
                      out: list[tuple[str, str, int, Any, Any, bytes]]) -> None:
        data = self._encode(rec, entries)[1:-1]
        if len(data) > MAX_BODY_BYTES and len(entries) > 1:
            half = len(entries) // 2
            self._track_chunks(rec, topic, entries[:half], out)
            self._track_chunks(rec, topic, entries[half:], out)
            return
        out.append((TRACK, topic, len(entries), entries[0]["timestamp"], entries[-1]["timestamp"], data))

    def _encode(self, rec: RunRec, value: Any) -> bytes:
        data, n = encode(value)
        if n:
            rec.nonfinite += n
            self.nonfinite_by_run[rec.path] = rec.nonfinite
            self.counters["nonfinite"] = self.counters.get("nonfinite", 0) + n
            self._touched_runs.add(rec.path)
        return data

    def _series(self, rec: RunRec, kind: str, name: str) -> Series:
        sid = series_id(rec.path, kind, name)
        s = self.series.get(sid)
        if s is None:
            s = self.series[sid] = Series(sid, rec.path, kind, name)
            if kind in COUNTED and rec.created:
                s.expect = 0
            self._touched_series.add(sid)
        return s

    def _run_item(self, item: RunItem, seq: int) -> RunRec | None:
        url = (item.dash_url or self.cfg_url).rstrip("/")
        if not url:
            return None
        token = item.token if item.dash_url else None
        rec = self.runs.get(item.run)
        info = {k: item.info.get(k) for k in ("description", "tags", "metadata")}
        if rec is None:
            rec = self.runs[item.run] = RunRec(item.run, url, item.prefix, token, info)
            self._server(url)
        elif rec.url != url:
            log.info("run=%s now ships to %s; it is created there anew", item.run, public_url(url))
            rec.url, rec.checked, rec.project_id, rec.folder_ids, rec.eid, rec.nid = url, False, None, [], None, None
            rec.created = False
            for s in self.series.values():
                if s.run == item.run:
                    s.expect, s.verify = None, False
                    self._touched_series.add(s.sid)
        if token != rec.token:
            rec.token = token
        if rec.eid is None:
            rec.info = info
        if item.final:
            rec.final_seq, rec.status, rec.done = seq, STATUS.get(item.status, "COMPLETED"), False
        elif rec.final_seq or rec.done:
            rec.final_seq, rec.done = 0, False
        self.active.add(item.run)
        self._touched_runs.add(item.run)
        return rec

    # -------------------------------------------------------------- dispatching
    def _token(self, rec: RunRec) -> str | None:
        """The token a run's requests carry: its own, else the agent's token file for the agent's server."""
        if rec.token:
            return rec.token
        return self._file_token if rec.url == self.cfg_url else None

    def _server(self, url: str) -> Server:
        srv = self.servers.get(url)
        if srv is None:
            srv = self.servers[url] = Server(url)
            host = urlsplit(url).hostname or ""
            if url.startswith("http://") and host not in ("localhost", "127.0.0.1", "::1"):
                log.warning("dash: %s is plain http: its token crosses the network unencrypted", public_url(url))
        return srv

    def _ready_at(self, rec: RunRec, own: float) -> float | None:
        """When a request of ``rec`` (itself due at ``own``) may go: None while a probe of its
        unreachable server is under way; a parked token is looked at again with the token file."""
        srv = self._server(rec.url)
        if _fp(self._token(rec)) in srv.parked:
            return self._token_checked + TOKEN_CHECK_S
        if srv.error is not None and srv.probing:
            return None
        return max(own, srv.next_at)

    def _blocked(self, rec: RunRec, now: float) -> bool:
        srv = self._server(rec.url)
        return (srv.next_at > now or _fp(self._token(rec)) in srv.parked
                or (srv.error is not None and srv.probing))

    def _dispatchable(self, now: float) -> bool:
        """True if a request could go now (due, and room for one more in flight)."""
        if self.pool is not None and self.pool.in_flight >= MAX_IN_FLIGHT:
            return False
        due = self._next_due(now)
        return due is not None and due <= now

    def _next_due(self, now: float) -> float | None:
        """When the next request could go (None: nothing waits)."""
        due: float | None = None
        waiting = self._waiting_runs()
        for path in self.active:
            rec = self.runs[path]
            if rec.busy or rec.refused or not (rec.eid is None or (rec.final_seq and not rec.done and path not in waiting)):
                continue
            t = self._ready_at(rec, rec.next_at)
            if t is not None:
                due = t if due is None else min(due, t)
        for s in self.series.values():
            if s.units - s.staged <= 0 or s.busy or s.dirty:
                continue
            owner = self.runs.get(s.run)
            if owner is None or owner.eid is None:
                continue
            t = self._ready_at(owner, s.next_at)
            if t is not None:
                due = t if due is None else min(due, t)
        return due

    def _waiting_runs(self) -> set[str]:
        """Runs with something unsent or unsettled (their status must wait)."""
        return {s.run for s in self.series.values() if s.units or s.busy or s.dirty} | {j.run for j, _ in self._refusals}

    def _dispatch(self, state: SinkState, now: float) -> None:
        if self.pool is None:
            if not self.active:
                return
            self.pool = Pool(WORKERS, "dashcar-agent")
        pool = self.pool
        if pool.in_flight >= MAX_IN_FLIGHT:
            return
        waiting = self._waiting_runs()
        for path in list(self.active):
            rec = self.runs[path]
            if rec.busy or rec.refused or rec.next_at > now or self._blocked(rec, now):
                continue
            if rec.eid is None:
                self._submit_setup(rec)
            elif rec.final_seq and not rec.done and path not in waiting:
                self._submit_status(rec)
            if pool.in_flight >= MAX_IN_FLIGHT:
                return
        order = list(self.series.values())
        if not order:
            return
        self._rotate = (self._rotate + 1) % len(order)
        for s in order[self._rotate:] + order[:self._rotate]:
            if s.units - s.staged <= 0 or s.busy or s.dirty or s.next_at > now:
                continue
            owner = self.runs.get(s.run)
            if owner is None or owner.eid is None or owner.refused or self._blocked(owner, now):
                continue
            if s.kind == FILES:
                self._submit_file(state, owner, s)
            elif s.kind in COUNTED and (s.verify or s.expect is None):
                self._submit_check(owner, s, None)
            else:
                entries = self._head(state, s)
                if not entries:
                    continue
                if s.verify and s.kind == TRACK:
                    self._submit_check(owner, s, entries)
                else:
                    self._submit_data(owner, s, entries)
            if pool.in_flight >= MAX_IN_FLIGHT:
                return

    def _head(self, state: SinkState, s: Series) -> list[_Entry]:
        """The committed entries the series' next request carries."""
        cap = {METRIC: METRIC_BATCH, TRACK: TRACK_BATCH, LOGS: LOG_BATCH, PARAMS: PARAMS_BATCH, FILES: 1}[s.kind]
        limit = 2
        while True:
            # Entries are read in growing pages: most requests take one or two of them, and a long
            # backlog must not be copied out of the store for each request.
            page = state.items(b"q:" + s.sid, limit=limit)
            out: list[_Entry] = []
            units = size = 0
            full = False
            for k, v in page:
                n, data = v[0], v[4]
                if out and (units + n > cap or size + len(data) > MAX_BODY_BYTES):
                    full = True
                    break
                out.append((k[2:], v))
                units += n
                size += len(data)
            if full or len(page) < limit or limit >= HEAD_ENTRIES:
                return out
            limit *= 8

    def _headers(self, rec: RunRec, key: str | None = None, content_type: str = "application/json") -> dict[str, str]:
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        token = self._token(rec)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if key:
            headers["Idempotency-Key"] = key
        return headers

    def _submit(self, rec: RunRec, job: Job, method: str, path: str, body: bytes | Multipart | None,
                key: str | None = None) -> None:
        assert self.pool is not None
        srv = self._server(rec.url)
        if srv.error is not None:
            srv.probing = True
        self._next_job += 1
        timeout_s = self.timeout_s
        if isinstance(body, Multipart):
            headers = self._headers(rec, key, body.content_type)
            headers["Content-Length"] = str(len(body))
            timeout_s += body.size / UPLOAD_MIN_BYTES_PER_S
        else:
            headers = self._headers(rec, key)
        job.method, job.path, job.timeout_s, job.url = method, path, timeout_s, rec.url
        self.jobs[self._next_job] = job
        url = rec.url + path
        self._note_deadline(time.time() + timeout_s)
        self.pool.submit(Request(self._next_job, method, url, headers, body, timeout_s))
        self.counters["requests"] = self.counters.get("requests", 0) + 1
        log.debug("dash: %s %s", method, path)

    def _note_deadline(self, t: float) -> None:
        """Before a request goes, record when it must have ended, in a file of its own: written before
        the request (a state commit comes only after it), it survives a SIGKILL without an fsync."""
        if t <= self._deadline or not self.deadline_path:
            return
        try:
            if self._deadline_fd is None:
                self._deadline_fd = os.open(self.deadline_path, os.O_RDWR | os.O_CREAT, 0o600)
            os.pwrite(self._deadline_fd, struct.pack("<d", t), 0)
        except OSError as exc:
            log.warning("dash: cannot record request deadlines in %s: %s", self.deadline_path, exc.strerror)
            self.deadline_path = ""
            return
        self._deadline = t

    def _previous_deadline(self) -> float:
        """The latest deadline of the requests a previous agent sent (0 if none)."""
        try:
            with open(self.deadline_path, "rb") as f:
                data = f.read(8)
        except OSError:
            return 0.0
        return float(struct.unpack("<d", data)[0]) if len(data) == 8 else 0.0

    def _key(self, rec: RunRec, *parts: object, body: bytes = b"") -> str:
        """An ``Idempotency-Key``: the run, then what identifies the request's content (a series' stream
        range and unit count, which a read-back that trims an entry changes; or a setup call's body)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{rec.url}\0{rec.prefix}".encode("utf-8", "surrogatepass"))
        for p in parts:
            h.update(b"\0" + (p if isinstance(p, bytes) else str(p).encode("utf-8", "surrogatepass")))
        h.update(body)
        return "dashcar-" + h.hexdigest()

    def _submit_setup(self, rec: RunRec) -> None:
        ns, project, folders, name = split_prefix(rec.prefix)
        rec.busy = True
        nodes = f"/api/namespaces/{_q(ns)}/nodes"
        if not rec.checked:
            body = orjson.dumps({"query": GET_PROJECT, "variables": {"namespace": ns}})
            self._submit(rec, Job(self._gen, "setup", rec.path, step="project?"), "POST", "/graphql", body)
        elif folders and rec.project_id is None:
            body = orjson.dumps({"type": "PROJECT", "name": project, "slug": project})
            self._submit(rec, Job(self._gen, "setup", rec.path, step="project"), "POST", nodes, body,
                         self._key(rec, "project", body=body))
        elif len(rec.folder_ids) < len(folders):
            i = len(rec.folder_ids)
            parent = rec.folder_ids[-1] if rec.folder_ids else "ROOT"
            body = orjson.dumps({"type": "FOLDER", "projectId": rec.project_id, "parentId": parent, "name": folders[i]})
            self._submit(rec, Job(self._gen, "setup", rec.path, step="folder"), "POST", nodes, body,
                         self._key(rec, "folder", i, body=body))
        else:
            parent = rec.folder_ids[-1] if rec.folder_ids else "ROOT"
            exp: dict[str, Any] = {"type": "EXPERIMENT", "name": name, "parentId": parent}
            if rec.project_id is not None:
                exp["projectId"] = rec.project_id
            else:
                exp["projectSlug"] = project
            info = rec.info
            if info.get("description") is not None:
                exp["description"] = info["description"]
            if info.get("tags"):
                exp["tags"] = info["tags"]
            if info.get("metadata") is not None:
                exp["metadata"] = info["metadata"]
            body = encode(exp)[0]
            self._submit(rec, Job(self._gen, "setup", rec.path, step="experiment"), "POST", nodes, body,
                         self._key(rec, "experiment", body=body))

    def _submit_status(self, rec: RunRec) -> None:
        rec.busy = True
        if rec.nid is None:
            body = orjson.dumps({"query": GET_NODE, "variables": {"experimentId": rec.eid}})
            self._submit(rec, Job(self._gen, "node", rec.path), "POST", "/graphql", body)
            return
        body = orjson.dumps({"status": rec.status})
        self._submit(rec, Job(self._gen, "status", rec.path), "PATCH", f"/api/nodes/{_q(rec.nid)}", body,
                     self._key(rec, "status", rec.final_seq, body=body))

    def _series_path(self, rec: RunRec, s: Series) -> str:
        exp = f"/api/experiments/{_q(rec.eid)}"
        if s.kind == METRIC:
            return f"{exp}/metrics/{_q(s.name)}"
        if s.kind == TRACK:
            return f"{exp}/tracks/{_q(s.name)}"
        return f"{exp}/logs" if s.kind == LOGS else f"{exp}/parameters"

    def _submit_data(self, rec: RunRec, s: Series, entries: list[_Entry]) -> None:
        parts = [v[4] for _, v in entries]
        units = sum(v[0] for _, v in entries)
        meta = False
        base = self._series_path(rec, s)
        if s.kind == METRIC:
            body = b'{"dataPoints":[' + b",".join(parts) + b"]"
            if s.meta_pending and s.meta:
                body += b"," + encode(s.meta)[0][1:-1]
                meta = True
            body += b"}"
            path = base + "/append-batch"
        elif s.kind == TRACK:
            body, path = b'{"entries":[' + b",".join(parts) + b"]}", base + "/append_batch"
        elif s.kind == LOGS:
            body, path = b'{"logs":[' + b",".join(parts) + b"]}", base
        else:
            data: dict[str, Any] = {}
            for p in parts:
                data.update(orjson.loads(p))
            body, path = b'{"data":' + encode(data)[0] + b"}", base
        s.busy = True
        job = Job(self._gen, "data", rec.path, s.sid, entries, units, meta)
        self._submit(rec, job, "POST", path, body, self._key(rec, s.kind, s.name, entries[0][0], entries[-1][0], units, meta))

    def _submit_file(self, state: SinkState, rec: RunRec, s: Series) -> None:
        """The next request of a run's files: what its head operation needs next (the project id, a
        FOLDER node, a read-back after an unanswered upload, the upload; a node's PATCH or DELETE)."""
        entries = self._head(state, s)
        if not entries:
            return
        op = orjson.loads(entries[0][1][4])
        fid = op["id"]
        job = Job(self._gen, "data", rec.path, s.sid, entries, 1, step=op["op"], ref=fid)
        nodes = f"/api/namespaces/{_q(split_prefix(rec.prefix)[0])}/nodes"
        if op["op"] != "put":
            node = (rec.files.get(fid) or [None, None, None])[2]
            if node is None:
                # Its put never reached the server (lost before it, or refused): nothing to change there.
                self._count_file(rec, "file_changes_without_file")
                self._acked(state, s, entries, 1)
                return
            s.busy = True
            if op["op"] == "delete":
                self._submit(rec, job, "DELETE", f"/api/nodes/{_q(node)}", None)
            else:
                body = self._encode(rec, op["fields"])
                self._submit(rec, job, "PATCH", f"/api/nodes/{_q(node)}", body, self._key(rec, "file", fid, body=body))
            return
        s.busy = True
        if rec.project_id is None:
            job.what = "project"
            body = orjson.dumps({"query": GET_EXP_PROJECT, "variables": {"experimentId": rec.eid}})
            self._submit(rec, job, "POST", "/graphql", body)
            return
        parent = rec.nid or "ROOT"
        here = ""
        for part in file_dir_parts(op["path"]):
            here += "/" + part
            folder = rec.folders.get(here)
            if folder is None:
                job.what, job.ref = "folder", here
                body = orjson.dumps({"type": "FOLDER", "projectId": rec.project_id, "experimentId": rec.eid,
                                     "parentId": parent, "name": part})
                self._submit(rec, job, "POST", nodes, body, self._key(rec, "file-folder", here, body=body))
                return
            parent = folder
        if s.verify:
            job.what = "check"
            self.counters["read_backs"] = self.counters.get("read_backs", 0) + 1
            body = orjson.dumps({"query": LIST_FILES, "variables": {"experimentId": rec.eid, "limit": LIST_FILES_PAGE,
                                                                     "offset": int(op.get("offset", 0))}})
            self._submit(rec, job, "POST", "/graphql", body)
            return
        blob = os.path.join(self.blob_dir, op["blob"])
        if not os.path.exists(blob):
            s.busy = False
            self._count_file(rec, "files_lost")
            self._count_file(rec, "files_lost_vanished")
            log.warning("dash: run=%s file %s: its kept bytes %s are gone", rec.path, op["filename"], blob)
            self._acked(state, s, entries, 1)
            return
        fields = {"type": "FILE", "projectId": rec.project_id, "experimentId": rec.eid, "parentId": parent,
                  "name": op["filename"], "checksum": op["checksum"]}
        if op.get("description"):
            fields["description"] = str(op["description"])
        if op.get("tags"):
            fields["tags"] = ",".join(op["tags"])
        if op.get("metadata"):
            fields["metadata"] = encode(op["metadata"])[0].decode()
        form = Multipart(fields, "file", op["filename"], op["content_type"], blob, op["size"])
        self._submit(rec, job, "POST", nodes, form, self._key(rec, "file", fid, op["checksum"]))

    def _submit_check(self, rec: RunRec, s: Series, entries: list[_Entry] | None) -> None:
        """Read back what the server holds of the series (its count, or the head request's rows)."""
        s.busy = True
        base = self._series_path(rec, s)
        if s.kind == METRIC:
            path = base + "/stats"
        elif s.kind == LOGS:
            path = base + "?limit=1"
        else:
            assert entries is not None
            first = min(v[2] for _, v in entries)
            last = max(v[3] for _, v in entries)
            path = f"{base}/data?format=json&start_timestamp={first!r}&end_timestamp={last!r}"
        self.counters["read_backs"] = self.counters.get("read_backs", 0) + 1
        self._submit(rec, Job(self._gen, "check", rec.path, s.sid, entries or []), "GET", path, None)

    # ----------------------------------------------------------------- replies
    def _collect(self, state: SinkState) -> None:
        if self.pool is None:
            return
        for reply in self.pool.take():
            job = self.jobs.pop(reply.tag, None)
            if job is not None:
                self._apply(state, job, reply)

    def _apply(self, state: SinkState, job: Job, reply: Reply) -> None:
        now = time.monotonic()
        if (probed := self.servers.get(job.url)) is not None:
            probed.probing = False
        rec = self.runs.get(job.run)
        s = self.series.get(job.sid) if job.sid else None
        if s is not None:
            s.busy = False
        if rec is not None and not job.sid:
            rec.busy = False
        if job.gen != self._gen:
            if s is not None and s.kind != PARAMS and s.units:
                s.verify = True
            return
        if rec is None:
            return
        srv = self._server(rec.url)
        outcome, body = classify(reply)
        what = f"{job.method} {job.path}"
        detail = self._scrub(describe(reply), rec)
        if outcome is Outcome.DOWN:
            wait = backoff(srv.attempt, base_s=BACKOFF_BASE_S, cap_s=self.retry_max_s)
            if srv.error is None:
                log.warning("dash: server %s unreachable (%s); its runs wait in the agent's state", public_url(srv.url), detail)
            srv.attempt += 1
            srv.error = detail
            srv.next_at = max(srv.next_at, now + wait)
            return
        if srv.error is not None:
            log.info("dash: server %s reachable again after %d attempts", public_url(srv.url), srv.attempt)
        srv.attempt, srv.error, srv.next_at = 0, None, 0.0
        if outcome is Outcome.AUTH:
            fp = _fp(self._token(rec))
            if fp not in srv.parked:
                log.warning("dash: %s refused the token (%s on %s): runs using it wait until the token changes",
                            public_url(srv.url), detail, what)
            srv.parked[fp] = f"{detail} on {what}"
            return
        retry_after = retry_after_s(reply.headers.get("retry-after"))
        if job.what in ("setup", "node", "status"):
            self._apply_run(state, rec, job, reply, outcome, body, retry_after, now, detail)
            return
        if s is None:
            return
        if s.kind == FILES:
            self._apply_file(state, rec, s, job, reply, outcome, body, retry_after, now, detail)
            return
        if outcome in (Outcome.AMBIGUOUS, Outcome.RETRY):
            if outcome is Outcome.AMBIGUOUS and job.what == "data" and s.kind != PARAMS:
                s.verify = True
            self._retry_later(s, job, reply, f"{detail} on {what}", retry_after, now,
                              at_once=bool(reply.status and 200 <= reply.status < 300))
            return
        if outcome is Outcome.REFUSED:
            if job.what == "check" and reply.status != 404:
                log.warning("dash: cannot read back %s (%s): sending again, which may duplicate", what, detail)
                s.verify = False
                if s.expect is None:
                    s.expect = 0
                self._touched_series.add(s.sid)
                return
            if job.what == "data":
                s.busy = True
                self._refusals.append((job, f"{detail} on {what}"))
                return
        s.attempt, s.error = 0, None
        if job.what == "check":
            self._apply_check(state, rec, s, job, body if outcome is Outcome.OK else None)
        else:
            self._acked(state, s, job.entries, job.units)
            if job.meta:
                s.meta_pending = False
            if s.kind in COUNTED and s.expect is not None:
                s.expect += job.units
            self.counters["delivered"] = self.counters.get("delivered", 0) + job.units

    def _apply_file(self, state: SinkState, rec: RunRec, s: Series, job: Job, reply: Reply, outcome: Outcome, body: Any,
                    retry_after: float, now: float, detail: str) -> None:
        """A reply to a file request (see ``_submit_file``)."""
        what = f"{job.method} {job.path}"
        if outcome is Outcome.OK:
            error = self._file_answer(state, rec, s, job, body)
            if error is None:
                s.attempt, s.error = 0, None
                return
            outcome, detail = Outcome.RETRY, error
        elif outcome is Outcome.REFUSED and job.step == "delete" and reply.status == 404:
            self._count_file(rec, "files_deleted")
            self._acked(state, s, job.entries, 1)
            return
        if outcome is Outcome.REFUSED and job.what in ("check", "project"):
            log.warning("dash: cannot %s (%s): uploading the file again, which may duplicate it",
                        "read back the run's files" if job.what == "check" else "learn the run's project", detail)
            if job.what == "project":
                rec.project_id = ""
            s.verify = False
            return
        if outcome is Outcome.REFUSED:
            s.busy = True
            self._refusals.append((job, f"{detail} on {what}"))
            return
        if outcome is Outcome.AMBIGUOUS and job.what == "data" and job.step == "put":
            s.verify = True
        self._retry_later(s, job, reply, f"{detail} on {what}", retry_after, now)

    def _retry_later(self, s: Series, job: Job, reply: Reply, error: str, retry_after: float, now: float,
                     at_once: bool = False) -> None:
        """Back the series off: exponentially, at least as long as ``Retry-After`` asks, and past a
        timed-out request's own deadline (the server may still be working on it); ``at_once``: no wait."""
        wait = 0.0 if at_once else backoff(s.attempt, base_s=BACKOFF_BASE_S, cap_s=self.retry_max_s)
        if reply.timed_out:
            wait = max(wait, job.timeout_s)
        s.attempt += 1
        s.error = error
        s.next_at = now + max(wait, retry_after)
        self.counters["retries"] = self.counters.get("retries", 0) + 1
        log.debug("dash: %s; retrying in %.2fs", error, s.next_at - now)

    def _file_answer(self, state: SinkState, rec: RunRec, s: Series, job: Job, body: Any) -> str | None:
        """Apply a 2xx answer to a file request; an error text if it is unusable."""
        if not isinstance(body, dict):
            return "answer is not a JSON object"
        self._touched_runs.add(rec.path)
        if job.what == "project":
            pid = ((body.get("data") or {}).get("experimentById") or {}).get("projectId")
            rec.project_id = str(pid) if pid is not None else ""
            return None
        if job.what == "folder":
            nid = (body.get("node") or {}).get("id")
            if nid is None:
                return "FOLDER node answered without node.id"
            rec.folders[job.ref] = str(nid)
            return None
        entry = orjson.loads(job.entries[0][1][4])
        if job.what == "check":
            s.verify = False
            page = ((body.get("data") or {}).get("experimentById") or {}).get("filesPaginated") or {}
            mine = {f[2] for f in rec.files.values() if f[2] is not None}
            for f in page.get("files") or []:
                if (isinstance(f, dict) and f.get("name") == entry["filename"] and str(f.get("id")) not in mine
                        and (f.get("physicalFile") or {}).get("checksum") == entry["checksum"]):
                    log.info("dash: run=%s already held file %s of an unanswered upload; not sent again",
                             rec.path, entry["filename"])
                    self.counters["not_resent"] = self.counters.get("not_resent", 0) + 1
                    self._file_held(state, rec, s, job, str(f["id"]))
                    return None
            if page.get("hasMore"):
                s.verify = True
                offset = int(entry.get("offset", 0)) + LIST_FILES_PAGE
                self._rewrite(state, s, job.entries[0][0], job.entries[0][1], [{**entry, "offset": offset}], [0, 0])
                s.dirty = True
            return None
        if job.step == "put":
            nid = (body.get("node") or {}).get("id")
            if nid is None:
                return "FILE node answered without node.id"
            self.counters["files_shipped"] = self.counters.get("files_shipped", 0) + 1
            self.counters["file_bytes"] = self.counters.get("file_bytes", 0) + int(entry["size"])
            self._file_held(state, rec, s, job, str(nid))
            return None
        self._count_file(rec, "files_deleted" if job.step == "delete" else "files_updated")
        self._acked(state, s, job.entries, 1)
        self.counters["delivered"] = self.counters.get("delivered", 0) + 1
        return None

    def _file_held(self, state: SinkState, rec: RunRec, s: Series, job: Job, nid: str) -> None:
        """The server holds the head file as node ``nid``."""
        if job.ref in rec.files:
            rec.files[job.ref][2] = nid
        self._count_file(rec, "files_on_server")
        self._acked(state, s, job.entries, 1)
        self.counters["delivered"] = self.counters.get("delivered", 0) + 1

    def _acked(self, state: SinkState, s: Series, entries: list[_Entry], units: int) -> None:
        """Entries the server holds leave the outbox (staged; the series waits for the commit)."""
        for k, v in entries:
            if s.kind == FILES and (blob := orjson.loads(v[4]).get("blob")):
                self._trash.append(blob)
            state.delete(b"q:" + k)
            s.size -= len(v[4])
            self.size -= len(v[4])
        s.units -= units
        self.units -= units
        s.dirty = True
        self._touched_series.add(s.sid)
        self._new_head(state, s, {k for k, _ in entries})

    def _new_head(self, state: SinkState, s: Series, gone: set[bytes]) -> None:
        if s.units <= 0:
            s.units, s.size, s.head_seq, s.head_created = 0, 0, 0, 0.0
            return
        for k, v in state.items(b"q:" + s.sid, limit=len(gone) + 1):
            if k[2:] not in gone:
                s.head_seq, s.head_created = int.from_bytes(k[2 + 8:2 + 16], "big"), v[1]
                return
        if s.staged_head is not None:
            s.head_seq, s.head_created = s.staged_head

    def _apply_check(self, state: SinkState, rec: RunRec, s: Series, job: Job, body: Any) -> None:
        """Drop from the outbox what the server turned out to hold."""
        self._touched_series.add(s.sid)
        s.dirty = True
        if s.kind in COUNTED:
            key = "totalDataPoints" if s.kind == METRIC else "total"
            try:
                count = int(body.get(key, 0)) if isinstance(body, dict) else 0
            except (TypeError, ValueError):
                count = 0
            if s.expect is None or not s.verify:
                s.expect = count if s.expect is None else s.expect
                s.verify = False
                return
            extra = count - s.expect
            s.verify = False
            if extra < 0:
                log.warning("dash: %s holds %d points fewer than sent (%d); sending on", self._series_path(rec, s), -extra, count)
                s.expect = count
                return
            s.expect = count
            if extra:
                self._drop_counted(state, s, extra)
            return
        entries = body.get("entries", []) if isinstance(body, dict) else []
        held: dict[float, list[dict[str, Any]]] = {}
        for e in entries if isinstance(entries, list) else []:
            if isinstance(e, dict) and isinstance(e.get("timestamp"), (int, float)):
                held.setdefault(float(e["timestamp"]), []).append(merge.flatten(e))
        s.verify = False
        found = 0
        for k, v in job.entries:
            rows = orjson.loads(b"[" + v[4] + b"]")
            keep = [r for r in rows if not _held(r, held)]
            if len(keep) < len(rows):
                found += len(rows) - len(keep)
                self._rewrite(state, s, k, v, keep, [] if not keep else [keep[0]["timestamp"], keep[-1]["timestamp"]])
        if found:
            self.counters["not_resent"] = self.counters.get("not_resent", 0) + found
            log.info("dash: %s already held %d rows of an unanswered request; not sent again", self._series_path(rec, s), found)

    def _drop_counted(self, state: SinkState, s: Series, extra: int) -> None:
        left = extra
        gone: set[bytes] = set()
        while left > 0:
            entries = state.items(b"q:" + s.sid, limit=HEAD_ENTRIES)
            entries = [(k, v) for k, v in entries if k[2:] not in gone]
            if not entries:
                break
            for k, v in entries:
                n = v[0]
                if n <= left:
                    self._rewrite(state, s, k[2:], v, [], [])
                    gone.add(k[2:])
                    left -= n
                else:
                    items = orjson.loads(b"[" + v[4] + b"]")[left:]
                    self._rewrite(state, s, k[2:], v, items, [v[2] + left, 0])
                    left = 0
                if left <= 0:
                    break
        self.counters["not_resent"] = self.counters.get("not_resent", 0) + extra - left
        log.info("dash: series %s of run %s: the server already held %d points of an unanswered request; not sent again",
                 s.name or s.kind, s.run, extra - left)
        if left:
            log.warning("dash: series %s of run %s: the server holds %d more than was sent", s.name or s.kind, s.run, left)

    def _rewrite(self, state: SinkState, s: Series, k: bytes, v: list[Any], keep: list[Any], bounds: list[Any]) -> None:
        """Replace an outbox entry by the part of it the server does not hold (delete it if none)."""
        old = len(v[4])
        gone = v[0] - len(keep)
        if keep:
            data = orjson.dumps(keep, option=orjson.OPT_NON_STR_KEYS)[1:-1]
            state.put(b"q:" + k, [len(keep), v[1], bounds[0], bounds[1], data])
            delta = len(data) - old
        else:
            state.delete(b"q:" + k)
            delta = -old
        s.units -= gone
        self.units -= gone
        s.size += delta
        self.size += delta
        if not keep:
            self._new_head(state, s, {k})

    def _apply_run(self, state: SinkState, rec: RunRec, job: Job, reply: Reply, outcome: Outcome, body: Any,
                   retry_after: float, now: float, detail: str) -> None:
        what = f"{job.method} {job.path}"
        if outcome is Outcome.OK and job.what == "setup":
            error = self._setup_step(rec, job.step, reply.status, body)
            if error is None:
                rec.attempt, rec.error, rec.next_at = 0, None, 0.0
                self._touched_runs.add(rec.path)
                return
            outcome, detail = Outcome.RETRY, error
        elif outcome is Outcome.OK and job.what == "node":
            node = (body.get("data") or {}).get("experimentNode") if isinstance(body, dict) else None
            if isinstance(node, dict) and node.get("id") is not None:
                rec.nid = str(node["id"])
                self._touched_runs.add(rec.path)
                return
            outcome, detail = Outcome.RETRY, "GetExperimentNode answered without an id"
        elif outcome is Outcome.OK:
            rec.done = True
            self._close_run(state, rec)
            log.info("dash: run=%s marked %s on %s", rec.path, rec.status, public_url(rec.url))
            return
        if outcome is Outcome.REFUSED:
            reason = f"{detail} on {what}"
            if job.what == "status":
                rec.done = True
                self._close_run(state, rec)
                self._refusals.append((job, reason))
                return
            log.warning("dash: run=%s refused by %s (%s); its data goes to dead letters", rec.path, public_url(rec.url), reason)
            rec.refused = self.refused_runs[rec.path] = reason
            self._touched_runs.add(rec.path)
            return
        wait = backoff(rec.attempt, base_s=BACKOFF_BASE_S, cap_s=self.retry_max_s)
        rec.attempt += 1
        rec.error = f"{detail} on {what}"
        rec.next_at = now + max(wait, retry_after)

    def _setup_step(self, rec: RunRec, step: str, status: int, body: Any) -> str | None:
        """Apply one answer of the run's setup; an error text if the answer is unusable."""
        if not isinstance(body, dict):
            return "answer is not a JSON object"
        if step == "project?":
            if body.get("errors"):
                return f"GraphQL errors: {str(body['errors'])[:200]}"
            ns = (body.get("data") or {}).get("namespace")
            if ns is None:
                rec.refused = self.refused_runs[rec.path] = f"namespace {split_prefix(rec.prefix)[0]!r} not found on the server"
                log.warning("dash: run=%s: %s; its data goes to dead letters", rec.path, rec.refused)
                return None
            project = split_prefix(rec.prefix)[1]
            found = next((p for p in ns.get("projects") or [] if isinstance(p, dict) and p.get("slug") == project), None)
            rec.checked = True
            rec.project_id = str(found["id"]) if found and found.get("id") is not None else None
            return None
        if step == "project":
            pid = (body.get("project") or {}).get("id")
            if pid is None:
                return "PROJECT node answered without project.id"
            rec.project_id = str(pid)
            return None
        if step == "folder":
            nid = (body.get("node") or {}).get("id")
            if nid is None:
                return "FOLDER node answered without node.id"
            rec.folder_ids.append(str(nid))
            return None
        eid = (body.get("experiment") or {}).get("id")
        if eid is None:
            return "EXPERIMENT node answered without experiment.id"
        rec.eid = str(eid)
        if rec.project_id is None:
            pid = (body.get("project") or {}).get("id") or body["experiment"].get("projectId")
            rec.project_id = str(pid) if pid is not None else None
        node = (body.get("node") or {}).get("id")
        rec.nid = str(node) if node is not None else None
        rec.created = status == 201
        for s in self.series.values():
            if s.run == rec.path and s.kind in COUNTED and s.expect is None and rec.created:
                s.expect = 0
                self._touched_series.add(s.sid)
        log.info("dash: run=%s is experiment %s on %s%s", rec.path, rec.eid, public_url(rec.url), " (new)" if rec.created else "")
        return None

    def _close_run(self, state: SinkState, rec: RunRec) -> None:
        """The run's status is on the server: forget its series; keep its ids for a reopening (whose
        series are then counted on the server before they send: they are no longer new)."""
        self.active.discard(rec.path)
        rec.created = False
        self._touched_runs.add(rec.path)
        for sid in [sid for sid, s in self.series.items() if s.run == rec.path]:
            del self.series[sid]
            self._touched_series.add(sid)
        self.counters["closed"] = self.counters.get("closed", 0) + 1
        rec.closed = self.counters["closed"]
        finished = [r for r in self.runs.values() if r.done]
        if len(finished) > MAX_CLOSED_RUNS:
            for old in sorted(finished, key=lambda r: r.closed)[: len(finished) - MAX_CLOSED_RUNS]:
                del self.runs[old.path]
                self.nonfinite_by_run.pop(old.path, None)
                self.refused_runs.pop(old.path, None)
                self._touched_runs.add(old.path)

    # ------------------------------------------------------------ dead letters
    def _take_refusals(self, state: SinkState) -> list[Rejected]:
        out: list[Rejected] = []
        for job, reason in self._refusals:
            s = self.series.get(job.sid) if job.sid else None
            if s is not None:
                s.busy = False
                items = [self._item(s, k, v) for k, v in job.entries]
                self._acked(state, s, job.entries, job.units)
                self.counters["refused"] = self.counters.get("refused", 0) + job.units
                out.append(Rejected(reason, items))
            elif not job.sid:
                rec = self.runs.get(job.run)
                if rec is not None:
                    out.append(Rejected(reason, [RunItem(ItemKind.RUN, rec.path, "", rec.prefix, {"status": rec.status}, "",
                                                         (rec.status or "").lower(), None, None, {}, True, True, rec.url, None)]))
        self._refusals = []
        for path in list(self.active):
            rec = self.runs[path]
            if rec.refused:
                out.extend(self._drain_refused(state, rec))
        return out

    def _drain_refused(self, state: SinkState, rec: RunRec) -> list[Rejected]:
        """Entries of a run the server refused go to dead letters, a page per send."""
        out: list[Rejected] = []
        for s in [s for s in self.series.values() if s.run == rec.path]:
            if s.busy or s.dirty or s.units - s.staged <= 0:
                continue
            entries = [(k[2:], v) for k, v in state.items(b"q:" + s.sid, limit=HEAD_ENTRIES)]
            if entries:
                out.append(Rejected(rec.refused or "refused", [self._item(s, k, v) for k, v in entries]))
                self._acked(state, s, entries, sum(v[0] for _, v in entries))
        if not any(s.units for s in self.series.values() if s.run == rec.path):
            rec.done = True
            self._close_run(state, rec)
        return out

    def _item(self, s: Series, k: bytes, v: list[Any]) -> Item:
        """An outbox entry as the stream item it came from (for its dead letter)."""
        values = orjson.loads(b"[" + v[4] + b"]") if s.kind != PARAMS else [orjson.loads(v[4])]
        if s.kind == METRIC:
            return PointsItem(ItemKind.POINTS, s.run, "metrics", None if s.name == UNNAMED_METRIC else s.name, v[2], values)
        if s.kind == TRACK:
            return RowsItem(ItemKind.ROWS, s.run, s.name, [r.pop("timestamp") for r in values], [], False, values)
        if s.kind == LOGS:
            return LogsItem(ItemKind.LOGS, s.run, v[2], values)
        if s.kind == FILES:
            op = values[0]
            meta = {k: op[k] for k in (*FILE_FIELDS, "size", "checksum", "content_type") if k in op}
            return FileItem(ItemKind.FILE, s.run, op["op"], op["id"], op.get("path", ""), op.get("filename", ""), [],
                            {**meta, **op.get("fields", {})}, 0)
        return ParamsItem(ItemKind.PARAMS, s.run, v[2], values[0], None, values[0])

    def _scrub(self, text: str, rec: RunRec) -> str:
        """``text`` without the run's token (a server may echo what it was sent)."""
        token = self._token(rec)
        return text.replace(token, "<token>") if token and token in text else text

    # ------------------------------------------------------------------ tokens
    def _check_token_file(self, now: float) -> None:
        """Re-read the agent's token file when it changed (at most once a second)."""
        if not self.token_file or now - self._token_checked < TOKEN_CHECK_S:
            return
        self._token_checked = now
        try:
            st = os.stat(self.token_file)
        except OSError as exc:
            self._token_stat = None
            if self._file_token is not None:
                log.warning("dash: token file %s is gone (%s)", self.token_file, exc.strerror)
                self._file_token = None
            return
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        if sig == self._token_stat:
            return
        self._token_stat = sig
        if st.st_mode & 0o077:
            log.warning("dash: token file %s can be read by others; chmod 600 it", self.token_file)
        try:
            with open(self.token_file, encoding="utf-8") as f:
                token = f.read().strip() or None
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("dash: cannot read token file %s: %s", self.token_file, type(exc).__name__)
            return
        if token != self._file_token and self._file_token is not None:
            log.info("dash: token file %s changed", self.token_file)
        self._file_token = token

    # ------------------------------------------------------------------ status
    def _publish(self) -> None:
        """Snapshot what ``status``, ``delivered`` and ``backlog`` report (they are read from other threads)."""
        now = time.monotonic()
        delivered = 1 << 62
        oldest: float | None = None
        retrying = 0
        errors: list[str] = []
        soonest: tuple[float, int] | None = None
        for s in self.series.values():
            if s.units:
                delivered = min(delivered, s.head_seq - 1)
                oldest = s.head_created if oldest is None else min(oldest, s.head_created)
            if s.error and s.next_at > now:
                retrying += 1
                errors.append(f"{s.name or s.kind} of {s.run}: {s.error}")
                if soonest is None or s.next_at < soonest[0]:
                    soonest = (s.next_at, s.attempt)
        for path in self.active:
            rec = self.runs[path]
            if rec.final_seq and not rec.done:
                delivered = min(delivered, rec.final_seq - 1)
            if rec.error and rec.next_at > now:
                errors.append(f"run {path}: {rec.error}")
                if soonest is None or rec.next_at < soonest[0]:
                    soonest = (rec.next_at, rec.attempt)
        servers: dict[str, Any] = {}
        for url, srv in self.servers.items():
            servers[public_url(url)] = {
                "reachable": srv.error is None,
                "error": srv.error,
                "parked": sorted(set(srv.parked.values())) or None,
            }
            if srv.error is not None:
                errors.insert(0, f"{public_url(url)} unreachable: {srv.error}")
                if soonest is None or srv.next_at < soonest[0]:
                    soonest = (srv.next_at, srv.attempt)
            for reason in sorted(set(srv.parked.values())):
                errors.insert(0, f"parked: {public_url(url)} refused the token ({reason}); it waits for a new token")
        snap: dict[str, Any] = {
            "remote": {
                "servers": servers,
                "runs": len(self.active),
                "series": len(self.series),
                "in_flight": len(self.jobs),
                "retrying_series": retrying,
                "outbox": {"units": self.units, "bytes": self.size, "max_bytes": self.max_bytes},
                "counters": dict(self.counters),
                "nonfinite_by_run": dict(self.nonfinite_by_run),
                "refused_runs": dict(self.refused_runs),
            },
        }
        if errors:
            snap["error"] = "; ".join(errors[:3]) + (f" (+{len(errors) - 3} more)" if len(errors) > 3 else "")
        if soonest is not None:
            snap["retry"] = {"attempt": soonest[1], "next_in_s": round(max(0.0, soonest[0] - now), 3)}
        with self._lock:
            self._snapshot = snap
            self._delivered = delivered
            self._backlog = (self.units, self.size, oldest)

    def status(self) -> dict[str, Any]:
        """Servers (reachable, parked and why), outbox, requests in flight, counters; never a token."""
        with self._lock:
            snap = dict(self._snapshot)
        if "remote" in snap:
            snap["remote"] = dict(snap["remote"])
        return snap


def _held(row: dict[str, Any], held: dict[float, list[dict[str, Any]]]) -> bool:
    """True if the server holds an entry at the row's timestamp with every field of the row."""
    return any(all(entry.get(k) == v for k, v in row.items()) for entry in held.get(float(row["timestamp"]), ()))


