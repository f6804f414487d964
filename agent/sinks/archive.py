"""The archive sink: the settled stream → Parquet objects on S3 (or a directory), each row once.

Layout under the URI's prefix (``s3://bucket/prefix`` or ``file:///path``)
- ``tracks/run_dir=<run>/name_dir=<topic>/<first>-<last>-<writer>-<part>.parquet``, likewise
  ``metrics/…/name_dir=<metric>/…``, ``logs/run_dir=<run>/…`` and ``params/run_dir=<run>/…``;
  ``runs/run_dir=<run>/<writer>-<hash>.json`` is the run's manifest. ``run_dir`` and
  ``name_dir`` are the local layout's names made safe for keys (``key_name``: no ``%``, no
  ``=``); the rows carry the true names in ``run`` and ``name``. ``first``-``last`` is the
  range of stream batches the object came from, ``writer`` a random id kept in the sink's
  state (two agents, or a state dir made anew, never share a key).
- Files: a put's or copy's bytes are the object ``files/run_dir=<run>/<id>/<filename>`` (id
  and file name through ``key_name``), and every file operation is a row of
  ``file_events/run_dir=<run>/<first>-<last>-<writer>-<part>.parquet`` (``FILE_EVENT_COLUMNS``:
  the call's fields, ``object_key`` relative to the URI, size and SHA-256 of the stored bytes,
  ``replaces``/``superseded`` for ML-Dash's overwrite by path and name, ``updated`` for an
  update's fields, ``lost`` with its reason when no bytes could be had). The run's file state
  (ids, keys, checksums, live names, copies waiting for their source) is in its state.
- Columns follow one schema policy (``column``): numbers are DOUBLE, bools BOOLEAN, strings
  VARCHAR, flat numeric lists DOUBLE[], anything else JSON text. A field's type is fixed the
  first time a run's series has a value for it (kept in the state); a later value that does
  not fit goes, as JSON text, to ``<field>:json``, and the field is null in that row.

Invariants
- One send becomes objects of at most ``roll_rows`` rows and ``roll_bytes`` bytes (and always
  under ``MAX_OBJECT_BYTES``: one PUT, no multipart), rolled by the runner's ``hold_frames`` /
  ``hold_s`` and at once when a run ends. An object's key and bytes are a function of its
  batches and of the state committed before them.
- Before uploading, the send's ranges and keys are committed as a plan; the commit that moves
  the cursor deletes it. A send that finds a plan rebuilds its ranges first (same keys, same
  bytes: a retry or a replay after a crash overwrites, never duplicates); a plan range the
  new batches cannot rebuild (the cursor skipped into it) is deleted from the store first.
- Files go before the rows that name them: the keys a send's puts and copies may write join
  the committed plan first, then the bytes are streamed (hashed on the way, never held whole)
  or copied on the server from an object the archive holds, then the ``file_events`` objects
  join the plan and go with the other tables. A key is a function of (run, id, filename), so
  a replay overwrites it; one that ends up holding nothing (the source was lost) leaves the
  plan and is deleted like any dropped key. A put of an id the run's state holds is the same
  call again (re-sent by a producer): skipped. A file whose bytes could not be had is a row
  with ``lost``, counted per run (``files_lost_<reason>``), and never stops the sink.
- A run's state (prefix, counts, the types of its fields) is committed with the cursor and kept
  after the run ends, so a run opened again continues its manifest and its types; only runs
  still open are held in memory.
- Every upload has the agent's deadline (``archive_timeout_s``). One that misses it is left to
  finish on its own thread and the send is retried; while it runs, nothing writes other bytes
  to its key (a stale manifest cannot land late) and nothing deletes it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib.abc
import logging
import math
import os
import queue
import re
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar
from urllib.parse import urlsplit

import orjson

from dashcar.proto import ConfigError, metric_dir_parts, split_name, stored_file_path, track_dir_name

from .. import files, layout, merge
from ..errors import SinkRetryable
from ..stream import FileItem, Item, LogsItem, MetaItem, ParamsItem, PointsItem, RowsItem, RunItem
from . import Rejected, WhenFull

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

    from ..config import AgentConfig
    from ..stream import Batch
    from ..wal import SinkState

log = logging.getLogger(__name__)
_T = TypeVar("_T")

MAX_OBJECT_BYTES: Final = 10 * 1024 * 1024 - 1
"""pyarrow's S3 stream sends an object below its 10 MiB part size in one PutObject."""
MAX_BATCHES: Final = 4096
"""Stream batches one send may gather (a minute of a busy agent's core steps)."""
UPLOADS_AT_ONCE: Final = 4
MAX_ABANDONED: Final = 8
"""Uploads past their deadline still running; beyond this, sends wait for them to end."""
FORMAT: Final = 1
REMOTE_NICE: Final = 5
"""The archive's thread runs this much kinder than the local sinks: under load, JSONL gets the CPU first."""
KEY_PART_MAX: Final = 100
COPY_OBJECT_MAX: Final = 5 * 1024 ** 3
"""S3's CopyObject copies at most 5 GiB; a larger object is copied as a stream through the agent."""
FILE_PART_BYTES: Final = 10 * 1024 * 1024
"""A file's upload gets ``archive_timeout_s`` per this many bytes (one multipart part) as its deadline."""
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_PREFIX_OK = re.compile(r"[A-Za-z0-9._/-]*")
OVERFLOW: Final = ":json"
"""Suffix of the column that holds, as JSON text, the values that did not fit their field's type."""

RESERVED: Final = {
    "tracks": ("run", "name", "timestamp", "_seq"),
    "metrics": ("run", "name", "folder", "index"),
    "logs": ("run", "sequence", "timestamp", "level", "message", "metadata"),
    "params": ("run", "version", "created_at"),
}
"""The columns every row of a kind has, in order; a field of the same name is stored as ``<name>_``."""


# ----------------------------------------------------------------------------- names
def key_name(parts: Iterable[str]) -> str:
    """A name as a key segment: the local layout's parts joined by ``_``, unsafe characters as ``_``.

    Distinct names may meet in one segment (as they would locally); object keys stay apart by
    their part numbers, and the rows say the true name. A long name is cut and hashed.
    """
    text = "_".join(parts)
    safe = _UNSAFE.sub("_", text)
    if len(safe) > KEY_PART_MAX:
        safe = safe[:KEY_PART_MAX - 11] + "-" + hashlib.blake2b(text.encode(), digest_size=5).hexdigest()
    return safe


def run_key(prefix: str) -> str:
    """``run_dir`` of a run prefix: ``alice/robotics/pick-place`` → ``alice_robotics_pick-place``."""
    try:
        return key_name(split_name(prefix, "run prefix"))
    except ValueError:
        return key_name([prefix])


def series_key(kind: str, name: str | None) -> str:
    """``name_dir`` of a topic (``robot/state`` → ``robot_state``) or metric (unnamed: ``None``)."""
    try:
        return key_name([track_dir_name(name)] if kind == "tracks" else metric_dir_parts(name))
    except ValueError:
        return key_name([str(name)])


@dataclass(frozen=True, slots=True)
class Target:
    """Where the archive goes: ``s3`` (bucket, key prefix, endpoint) or ``file`` (a directory)."""

    scheme: str
    bucket: str
    prefix: str
    endpoint: str

    def describe(self) -> str:
        """The URI, for status and logs (no credentials are ever part of it)."""
        if self.scheme == "file":
            return f"file://{self.prefix}"
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def parse_uri(uri: str, endpoint: str = "", environ: dict[str, str] | None = None) -> Target:
    """Check ``archive_uri`` and resolve the endpoint (``archive_endpoint``, else ``AWS_ENDPOINT_URL``).

    :raises ConfigError: an unknown scheme, a relative path, or a prefix with characters keys must not hold.
    """
    env = os.environ if environ is None else environ
    parts = urlsplit(uri)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ConfigError(f"archive_uri {uri!r}: use file:///absolute/path")
        return Target("file", "", os.path.normpath(parts.path), "")
    if parts.scheme != "s3" or not parts.netloc:
        raise ConfigError(f"archive_uri {uri!r}: use s3://bucket/prefix or file:///path")
    prefix = parts.path.strip("/")
    if not _PREFIX_OK.fullmatch(prefix) or any(p in ("", ".", "..") for p in prefix.split("/") if prefix):
        raise ConfigError(f"archive_uri {uri!r}: the prefix may hold only letters, digits, '.', '_', '-' and '/'")
    ep = endpoint or env.get("AWS_ENDPOINT_URL_S3", "") or env.get("AWS_ENDPOINT_URL", "")
    return Target("s3", parts.netloc, prefix, ep)


# ----------------------------------------------------------------------------- stores
class Store(Protocol):
    """Where objects go: whole objects in, atomically; deleting a missing key is no error."""

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` as ``key`` (a reader sees all of it or nothing)."""

    def delete(self, key: str) -> None:
        """Remove ``key`` if it is there."""

    def put_stream(self, key: str, fill: Callable[[Callable[[bytes], object]], _T]) -> _T:
        """Write ``key`` from what ``fill`` passes to its writer, piece by piece; ``fill``'s result.

        If ``fill`` raises, ``key`` holds nothing of it (a partial object is removed again).
        """

    def copy(self, src: str, dst: str, size: int) -> None:
        """Copy object ``src`` (of ``size`` bytes) to ``dst`` within the store.

        :raises FileNotFoundError: the store holds no ``src``.
        """


class FileStore:
    """A directory: each object written to a temp file, fsynced, renamed into place."""

    def __init__(self, root: str, writer: str) -> None:
        self.root = root
        self.tmp = os.path.join(root, ".tmp", writer)

    def open(self) -> None:
        """Remove temp files a crash left (this writer's only)."""
        os.makedirs(self.tmp, exist_ok=True)
        for name in os.listdir(self.tmp):
            os.unlink(os.path.join(self.tmp, name))

    def put(self, key: str, data: bytes) -> None:
        """Write, fsync, rename, fsync the directory."""
        path = os.path.join(self.root, key)
        tmp = os.path.join(self.tmp, f"{threading.get_ident()}-{os.path.basename(key)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            layout.pwrite_all(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(tmp, path)
        layout.fsync_dir(os.path.dirname(path))

    def delete(self, key: str) -> None:
        """Unlink if present."""
        try:
            os.unlink(os.path.join(self.root, key))
        except FileNotFoundError:
            pass

    def _tmp(self, key: str) -> str:
        return os.path.join(self.tmp, f"{threading.get_ident()}-{os.path.basename(key)}.tmp")

    def _land(self, tmp: str, key: str) -> None:
        path = os.path.join(self.root, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(tmp, path)
        layout.fsync_dir(os.path.dirname(path))

    def put_stream(self, key: str, fill: Callable[[Callable[[bytes], object]], _T]) -> _T:
        """Write to a temp file as ``fill`` writes, fsync, rename, fsync the directory."""
        tmp = self._tmp(key)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        pos = 0

        def write(data: bytes) -> None:
            nonlocal pos
            layout.pwrite_all(fd, data, pos)
            pos += len(data)

        try:
            result = fill(write)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        self._land(tmp, key)
        return result

    def copy(self, src: str, dst: str, size: int) -> None:
        """Hard-link ``src`` (objects are replaced by rename, never written in place), else copy it."""
        tmp = self._tmp(dst)
        source = os.path.join(self.root, src)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            os.link(source, tmp)
        except FileNotFoundError:
            raise
        except OSError:
            shutil.copyfile(source, tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._land(tmp, dst)


class S3Store:
    """A bucket through pyarrow's S3 filesystem; objects below 10 MiB go in one PutObject."""

    def __init__(self, target: Target, timeout_s: float) -> None:
        import pyarrow.fs as pafs

        ep = urlsplit(target.endpoint if "://" in target.endpoint else f"https://{target.endpoint}") if target.endpoint else None
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
        self.bucket = target.bucket
        self.fs: pafs.S3FileSystem = pafs.S3FileSystem(
            region=region,
            endpoint_override=ep.netloc if ep else None,
            scheme="http" if ep and ep.scheme == "http" else "https",
            connect_timeout=min(timeout_s, 10.0),
            request_timeout=timeout_s,
            background_writes=False,
            allow_delayed_open=True,  # type: ignore[call-arg]  # pyarrow >= 15 has it, its stubs do not
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
        )

    def put(self, key: str, data: bytes) -> None:
        """One PutObject (delayed open: the stream sends it at close)."""
        with self.fs.open_output_stream(f"{self.bucket}/{key}") as out:
            out.write(data)

    def delete(self, key: str) -> None:
        """DeleteObject; a missing key is fine."""
        try:
            self.fs.delete_file(f"{self.bucket}/{key}")
        except FileNotFoundError:
            pass

    def put_stream(self, key: str, fill: Callable[[Callable[[bytes], object]], _T]) -> _T:
        """One PutObject below pyarrow's part size, else a multipart upload, parts sent as they fill.

        pyarrow's stream has no abort: closing it (as its destructor would) stores what was
        written, so after a failure the partial object is deleted again.
        """
        path = f"{self.bucket}/{key}"
        out = self.fs.open_output_stream(path)
        try:
            result = fill(out.write)
        except BaseException:
            with contextlib.suppress(Exception):
                out.close()
            with contextlib.suppress(Exception):
                self.fs.delete_file(path)
            raise
        out.close()
        return result

    def copy(self, src: str, dst: str, size: int) -> None:
        """CopyObject on the server; past its 5 GiB limit, read back and written again as a stream."""
        if size > COPY_OBJECT_MAX:
            source = self.fs.open_input_stream(f"{self.bucket}/{src}")
            with source:
                self.put_stream(dst, lambda write: _pump(source.read, write))
            return
        try:
            self.fs.copy_file(f"{self.bucket}/{src}", f"{self.bucket}/{dst}")
        except OSError as exc:
            if "NO_SUCH_KEY" in str(exc) or isinstance(exc, FileNotFoundError):
                raise FileNotFoundError(errno.ENOENT, f"no object {src}") from exc
            raise


def _pump(read: Callable[[int], bytes], write: Callable[[bytes], object]) -> None:
    while chunk := read(files.CHUNK):
        write(chunk)


# ----------------------------------------------------------------------------- columns
class _NoPandas(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        if name.partition(".")[0] == "pandas":
            raise ImportError("the archive sink converts lists only")


def prepare_arrow() -> None:
    """Keep pyarrow from importing pandas into the agent.

    ``pa.array`` imports pandas (35 MB, 0.4 s) to check whether its input is a pandas object;
    the sink only ever converts lists, so pyarrow is made to find pandas absent (it still imports
    it if something later needs it).
    """
    import pyarrow as pa

    if "pandas" not in sys.modules:
        finder = _NoPandas()
        sys.meta_path.insert(0, finder)
        try:
            pa.array([0.0])
        finally:
            sys.meta_path.remove(finder)


NUMBER, BOOL, TEXT, NUMBERS, JSON = "d", "b", "s", "l", "j"
"""Field types: DOUBLE, BOOLEAN, VARCHAR, DOUBLE[], VARCHAR of JSON text."""
_NONE = type(None)


def json_text(value: Any) -> str:
    """A value as JSON text (NaN and ±Inf become null, as strict JSON has no word for them)."""
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except orjson.JSONEncodeError:
        return layout.dumps(value)


def type_of(value: Any) -> str | None:
    """The field type a first value fixes (None: a null fixes nothing)."""
    t = type(value)
    if t is float or t is int:
        return NUMBER
    if t is bool:
        return BOOL
    if t is str:
        return TEXT
    if t is list and all(type(x) in (float, int, bool, _NONE) for x in value):
        return NUMBERS
    return None if value is None else JSON


def _fits(value: Any, kind: str) -> bool:
    t = type(value)
    if kind == NUMBER:
        return (t is float or t is int) and (t is float or -(1 << 53) <= value <= 1 << 53)
    if kind == BOOL:
        return t is bool
    if kind == TEXT:
        return t is str
    return t is list and all(type(x) in (float, int, bool, _NONE) and (type(x) is not int or -(1 << 53) <= x <= 1 << 53)
                             for x in value)


def arrow_type(kind: str) -> pa.DataType:
    """The Arrow type of a field type."""
    import pyarrow as pa

    if kind == NUMBER:
        return pa.float64()
    if kind == BOOL:
        return pa.bool_()
    if kind == NUMBERS:
        return pa.list_(pa.float64())
    return pa.string()


_FAST: Final[dict[str, set[type]]] = {NUMBER: {float, int}, BOOL: {bool}, TEXT: {str}, NUMBERS: {list}}


def column(values: list[Any], kind: str) -> tuple[pa.Array[Any], pa.Array[Any] | None]:
    """``values`` as an array of ``kind``, and the JSON overflow of those that do not fit (or None)."""
    import pyarrow as pa

    if kind == JSON:
        return pa.array([None if v is None else json_text(v) for v in values], pa.string()), None
    arrow = arrow_type(kind)
    kinds = set(map(type, values))
    kinds.discard(_NONE)
    if kinds <= _FAST[kind]:
        try:
            return pa.array(values, arrow), None
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            pass
    kept: list[Any] = []
    over: list[str | None] = []
    spilled = False
    for v in values:
        if v is None or _fits(v, kind):
            kept.append(v)
            over.append(None)
        else:
            kept.append(None)
            over.append(json_text(v))
            spilled = True
    return pa.array(kept, arrow), (pa.array(over, pa.string()) if spilled else None)


def field_columns(
    rows: list[dict[str, Any]], types: dict[str, str], reserved: tuple[str, ...]
) -> list[tuple[str, pa.Array[Any]]]:
    """The fields of ``rows`` as named columns, sorted by name, typed by ``types`` (new fields added to it).

    A field named like a reserved column is stored as ``<name>_`` (one more ``_`` per clash).
    """
    names: set[str] = set()
    for r in rows:
        names.update(r)
    out: list[tuple[str, pa.Array[Any]]] = []
    taken = set(reserved)
    for name in sorted(names):
        values = [r.get(name) for r in rows]
        kind = types.get(name)
        if kind is None:
            kind = next((k for k in map(type_of, values) if k is not None), None)
            if kind is None:
                continue
            types[name] = kind
        col = name
        while col in taken:
            col += "_"
        taken.add(col)
        arr, over = column(values, kind)
        out.append((col, arr))
        if over is not None:
            spill = col + OVERFLOW
            while spill in taken or spill in names:
                spill += "_"
            taken.add(spill)
            out.append((spill, over))
    return out


# ----------------------------------------------------------------------------- objects
@dataclass(slots=True)
class _Group:
    """Rows of one (kind, run, series) within one range of stream batches."""

    kind: str
    run: str
    name: str | None
    folder: str = "metrics"
    head: dict[str, list[Any]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    late: int = 0
    items: list[Item] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Obj:
    """One object to upload: its key, bytes and what it holds."""

    key: str
    data: bytes
    kind: str
    run: str
    name: str | None
    rows: int


@dataclass(frozen=True, slots=True)
class _FileOp:
    """A ``FileItem`` of a send, where it came from, and its object's key (relative; '' for update, delete)."""

    item: FileItem
    seq: int
    index: int
    rel: str


FILE_EVENT_COLUMNS: Final = (
    "run", "op", "id", "path", "filename", "object_key", "size", "sha256", "content_type", "description", "tags",
    "bindrs", "metadata", "time", "source_id", "replaces", "superseded", "updated", "lost", "changed_after_call",
    "_seq", "_index",
)
"""The ``file_events`` table's columns, in order (see the module docstring)."""


def file_events_schema() -> pa.Schema:
    """The Arrow schema of a ``file_events`` object."""
    import pyarrow as pa

    text, texts = pa.string(), pa.list_(pa.string())
    types = {"size": pa.int64(), "tags": texts, "bindrs": texts, "time": pa.timestamp("us", tz="UTC"),
             "superseded": pa.bool_(), "updated": texts, "changed_after_call": pa.bool_(), "_seq": pa.int64(),
             "_index": pa.int64()}
    return pa.schema([(c, types.get(c, text)) for c in FILE_EVENT_COLUMNS])


def _texts(value: object) -> list[str] | None:
    return None if value is None else [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as Parquet (zstd), the same bytes for the same table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = pa.BufferOutputStream()
    pq.write_table(table, out, compression="zstd")
    return bytes(out.getvalue().to_pybytes())


def split_encode(table: pa.Table, roll_rows: int, roll_bytes: int) -> list[tuple[bytes, int]]:
    """``table`` as Parquet objects of at most ``roll_rows`` rows and about ``roll_bytes`` bytes each.

    An encoding past ``roll_bytes`` is split into as many equal row slices as it takes; every
    object is below ``MAX_OBJECT_BYTES`` (a single row past it cannot be archived).
    """
    n = table.num_rows
    if n > roll_rows:
        k = math.ceil(n / roll_rows)
        step = math.ceil(n / k)
        return [b for i in range(0, n, step) for b in split_encode(table.slice(i, step), roll_rows, roll_bytes)]
    data = parquet_bytes(table)
    limit = min(roll_bytes, MAX_OBJECT_BYTES)
    if len(data) <= limit:
        return [(data, n)]
    if n <= 1:
        if len(data) <= MAX_OBJECT_BYTES:
            return [(data, n)]
        raise ValueError(f"one row encodes to {len(data)} bytes, past the {MAX_OBJECT_BYTES}-byte object limit")
    k = max(2, math.ceil(len(data) / limit))
    step = math.ceil(n / k)
    return [b for i in range(0, n, step) for b in split_encode(table.slice(i, step), roll_rows, roll_bytes)]


# ----------------------------------------------------------------------------- uploads
class _Worker:
    """A daemon thread that runs upload calls one after another until told to stop (``None``)."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[tuple[Callable[[], None], threading.Event, list[BaseException | None], int] | None] = (
            queue.SimpleQueue()
        )
        self.thread = threading.Thread(target=self._loop, name="archive-upload", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            call, done, errors, j = job
            try:
                call()
            except BaseException as exc:
                errors[j] = exc
            done.set()


class Uploads:
    """Runs uploads on a few worker threads under a deadline; one past it is abandoned, not stopped.

    An abandoned upload may still land: the same key may only be written again with the same
    bytes while it runs, and not deleted (``busy``). Its worker leaves the pool and ends with it.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.abandoned: dict[str, tuple[threading.Thread, bytes]] = {}
        self.idle: list[_Worker] = []
        self.stopping = threading.Event()
        """Set when the agent stops: waiting uploads are abandoned at once."""

    def _prune(self) -> None:
        for key in [k for k, (t, _) in self.abandoned.items() if not t.is_alive()]:
            del self.abandoned[key]

    def running(self) -> int:
        """Abandoned uploads still running (safe from any thread: it changes nothing)."""
        return sum(1 for t, _ in list(self.abandoned.values()) if t.is_alive())

    def busy(self, key: str, digest: bytes | None = None) -> bool:
        """True if an abandoned upload of ``key`` still runs (with other bytes than ``digest``, if given)."""
        self._prune()
        hit = self.abandoned.get(key)
        return hit is not None and (digest is None or hit[1] != digest)

    def run(self, jobs: list[tuple[str, bytes, Callable[[], None]]], what: str, timeouts: list[float] | None = None) -> None:
        """Run ``(key, digest, call)`` jobs, a few at a time, each within the deadline (``timeouts``: per job).

        :raises SinkRetryable: one failed or missed its deadline (the others of its wave finish first).
        """
        self._prune()
        if len(self.abandoned) >= MAX_ABANDONED:
            raise SinkRetryable(f"{len(self.abandoned)} {what}s past their deadline still run; waiting for them to end")
        for key, digest, _ in jobs:
            if self.busy(key, digest):
                raise SinkRetryable(f"an abandoned {what} of {key} still runs; retrying once it ends")
        for i in range(0, len(jobs), UPLOADS_AT_ONCE):
            wave = jobs[i:i + UPLOADS_AT_ONCE]
            errors: list[BaseException | None] = [None] * len(wave)
            running: list[tuple[_Worker, threading.Event]] = []
            for j, (_, _, call) in enumerate(wave):
                worker = self.idle.pop() if self.idle else _Worker()
                done = threading.Event()
                worker.jobs.put((call, done, errors, j))
                running.append((worker, done))
            wait_s = max(timeouts[i:i + UPLOADS_AT_ONCE]) if timeouts else self.timeout_s
            deadline = time.monotonic() + wait_s
            late: list[str] = []
            for (key, digest, _), (worker, done) in zip(wave, running, strict=True):
                while not done.is_set() and not self.stopping.is_set() and time.monotonic() < deadline:
                    done.wait(min(0.1, max(0.0, deadline - time.monotonic())))
                if done.is_set():
                    self.idle.append(worker)
                else:
                    worker.jobs.put(None)
                    self.abandoned[key] = (worker.thread, digest)
                    late.append(key)
            if late and self.stopping.is_set():
                raise SinkRetryable(f"the agent is stopping: {what} of {late[0]} abandoned (the backlog stays in the WAL)")
            if late:
                raise SinkRetryable(f"{what} of {late[0]} took more than {wait_s:g}s (abandoned, retried)")
            failed = next((e for e in errors if e is not None), None)
            if failed is not None:
                raise SinkRetryable(f"{what} failed: {failed}") from failed


# ----------------------------------------------------------------------------- sink
def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class ArchiveSink:
    """Parquet on object storage; see the module docstring for layout and invariants."""

    name = "archive"
    when_full: WhenFull = "skip"
    barrier = False
    max_batches = MAX_BATCHES

    def __init__(self, cfg: AgentConfig) -> None:
        if not cfg.archive_uri:
            raise ConfigError("the archive sink needs archive_uri (s3://bucket/prefix or file:///path)")
        if not 0 < cfg.archive_roll_bytes <= MAX_OBJECT_BYTES:
            raise ConfigError(f"archive_roll_bytes must be between 1 and {MAX_OBJECT_BYTES} (one PUT per object)")
        if cfg.archive_roll_rows < 1 or cfg.archive_roll_s <= 0 or cfg.archive_timeout_s <= 0:
            raise ConfigError("archive_roll_rows, archive_roll_s and archive_timeout_s must be positive")
        self.target = parse_uri(cfg.archive_uri, cfg.archive_endpoint)
        self.roll_rows = cfg.archive_roll_rows
        self.roll_bytes = cfg.archive_roll_bytes
        self.hold_frames = self.max_frames = cfg.archive_roll_rows
        self.hold_s = cfg.archive_roll_s
        self.uploads = Uploads(cfg.archive_timeout_s)
        self.store: Store | None = None
        self.writer = ""
        self.plan: list[list[Any]] = []
        self.runs: dict[str, dict[str, Any]] = {}
        self._touched: set[str] = set()
        self._final: set[str] = set()
        self._refused: list[Rejected] = []
        self._niced = 0
        self.counters = {"objects": 0, "bytes": 0, "rows": 0, "manifests": 0, "replayed": 0, "deleted": 0,
                         "files_shipped": 0, "file_bytes": 0, "files_lost": 0, "files_changed_after_call": 0}
        self.files_lost_by_reason: dict[str, int] = {}
        self.files_lost_by_run: dict[str, int] = {}
        self._file_counts: list[tuple[str, str, int]] = []
        """Counts of the send under way, ``(run, name, n)``: added to the sink's figures once committed."""
        self._shipped: dict[str, tuple[int, str, bool]] = {}
        """File objects this process stored for a plan not yet committed (a retry does not send them again)."""

    # ---------------------------------------------------------------- open
    def open(self, state: SinkState) -> None:
        """Load the writer id and the plan; connect (no request is made until a send)."""
        writer = state.get(b"writer")
        if not writer:
            writer = secrets.token_hex(6)
            state.put(b"writer", writer)
            state.commit()
        self.writer = str(writer)
        prepare_arrow()
        if self._niced != threading.get_ident() and threading.current_thread() is not threading.main_thread():
            from ..service import lower_thread_priority

            lower_thread_priority(REMOTE_NICE)
            self._niced = threading.get_ident()
        self.plan = [list(p) for p in state.get(b"plan", [])]
        self.runs = {}
        self._touched = set()
        self._final = set()
        if self.store is None:
            try:
                if self.target.scheme == "file":
                    fstore = FileStore(self.target.prefix, self.writer)
                    fstore.open()
                    self.store = fstore
                else:
                    self.store = S3Store(self.target, self.uploads.timeout_s)
            except OSError as exc:
                raise SinkRetryable(f"cannot open {self.target.describe()}: {exc}") from exc

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.target.prefix if self.target.scheme == "s3" else "", *parts) if p)

    # ---------------------------------------------------------------- runs
    def _run(self, state: SinkState, path: str) -> dict[str, Any]:
        run = self.runs.get(path)
        if run is None:
            stored = state.get(b"r:" + path.encode())
            if isinstance(stored, dict):
                run = stored
            else:
                seed = layout.read_json(os.path.join(path, "experiment.json"))
                prefix = seed.get("prefix") if isinstance(seed, dict) else None
                run = {
                    "prefix": prefix if isinstance(prefix, str) else path.lstrip("/"), "root": "", "info": {},
                    "status": "running", "reason": None, "created_at": None, "closed_at": None, "counters": {},
                    "final": False, "local": True, "series": {}, "types": {}, "objects": 0, "bytes": 0,
                }
            run["key"] = run_key(run["prefix"])
            self.runs[path] = run
        self._touched.add(path)
        return run

    def _series(self, run: dict[str, Any], kind: str, name: str | None, folder: str = "metrics") -> dict[str, Any]:
        sid = f"{kind}:{folder}:{name}" if kind == "metrics" and folder != "metrics" else f"{kind}:{name}"
        s: dict[str, Any] | None = run["series"].get(sid)
        if s is None:
            s = run["series"][sid] = {"kind": kind, "name": name, "rows": 0, "objects": 0}
            if folder != "metrics":
                s["folder"] = folder
        return s

    # ---------------------------------------------------------------- send
    def send(self, batches: list[Batch], state: SinkState) -> list[Rejected]:
        """Rebuild planned ranges, plan and build the rest, upload everything, stage the state."""
        if not batches:
            return []
        assert self.store is not None, "open() comes first"
        self._refused = []
        first, last = batches[0].seq, batches[-1].seq
        reuse, stale = self._check_plan(first, last)
        if stale:
            self._delete(stale)
            self.plan = reuse
            self._commit_plan(state)
        by_seq = {b.seq: b for b in batches}
        ranges = [(p[0], p[1]) for p in reuse]
        start = ranges[-1][1] + 1 if ranges else first
        if start <= last:
            ranges.append((start, last))
        objs: list[Obj] = []
        plan: list[list[Any]] = []
        fops: list[tuple[int, int, list[_FileOp]]] = []
        self._file_counts = []
        for lo, hi in ranges:
            ops: list[_FileOp] = []
            made = self._build(state, [by_seq[s] for s in range(lo, hi + 1)], lo, hi, ops)
            objs.extend(made)
            plan.append([lo, hi, [o.key for o in made]])
            fops.append((lo, hi, ops))
        if any(ops for _, _, ops in fops):
            for entry, (landed, events) in zip(plan, self._ship_files(state, plan, fops), strict=True):
                entry[2].extend([*landed, *(o.key for o in events)])
                objs.extend(events)
        if plan != self.plan:
            dropped = {k for p in self.plan for k in p[2]} - {k for p in plan for k in p[2]}
            if dropped:
                self._delete(sorted(dropped))
            self.plan = plan
            if objs:
                self._commit_plan(state)
        self.counters["replayed"] += sum(len(p[2]) for p in reuse)
        store = self.store
        self.uploads.run([(o.key, _digest(o.data), _bound(store.put, o.key, o.data)) for o in objs], "upload")
        for o in objs:
            self.counters["objects"] += 1
            self.counters["bytes"] += len(o.data)
            self.counters["rows"] += o.rows
        manifests = [(k, d) for k, d in (self._manifest(path) for path in sorted(self._touched))]
        self.uploads.run([(k, _digest(d), _bound(store.put, k, d)) for k, d in manifests], "manifest")
        self.counters["manifests"] += len(manifests)
        if self.plan:
            state.delete(b"plan")
        for path in self._touched:
            state.put(b"r:" + path.encode(), self.runs[path])
        self._final = {p for p in self._touched if self.runs[p]["final"]}
        self._touched = set()
        return self._refused

    def _check_plan(self, first: int, last: int) -> tuple[list[list[Any]], list[str]]:
        """The plan's ranges this send rebuilds, and the keys of those it cannot (to delete)."""
        reuse: list[list[Any]] = []
        stale: list[str] = []
        expect = first
        for p in self.plan:
            if p[0] == expect and p[1] <= last:
                reuse.append(p)
                expect = p[1] + 1
            else:
                stale.extend(p[2])
                expect = -1
        return reuse, stale

    def _commit_plan(self, state: SinkState) -> None:
        if self.plan:
            state.put(b"plan", self.plan)
        else:
            state.delete(b"plan")
        state.commit()

    def _delete(self, keys: list[str]) -> None:
        for key in keys:
            if self.uploads.busy(key):
                raise SinkRetryable(f"an abandoned upload of {key} still runs; deleting it once it ends")
        for key in keys:
            self._shipped.pop(key, None)
        store = self.store
        assert store is not None
        self.uploads.run([(k, b"", _bound(store.delete, k)) for k in keys], "delete")
        self.counters["deleted"] += len(keys)
        log.info("sink=archive deleted %d objects of a range it will not write again", len(keys))

    # ---------------------------------------------------------------- build
    def _build(self, state: SinkState, batches: list[Batch], lo: int, hi: int, fops: list[_FileOp]) -> list[Obj]:
        """Objects of the stream batches ``lo``..``hi`` (and the run state they change); their file
        operations are appended to ``fops``, to be shipped by ``_ship_files``."""
        groups: dict[tuple[str, str, str | None, str], _Group] = {}

        def group(kind: str, run: str, name: str | None, folder: str = "metrics") -> _Group:
            g = groups.get((kind, run, name, folder))
            if g is None:
                g = groups[(kind, run, name, folder)] = _Group(kind, run, name, folder)
            g.items.append(item)
            return g

        for batch in batches:
            seq = batch.seq
            for index, item in enumerate(batch.items):
                if isinstance(item, FileItem):
                    run = self._run(state, item.run)
                    fops.append(_FileOp(item, seq, index, self._file_rel(run, item)))
                elif isinstance(item, RunItem):
                    run = self._run(state, item.run)
                    run.update(prefix=item.prefix, root=item.root, info=item.info, status=item.status, reason=item.reason,
                               created_at=item.created_at, closed_at=item.closed_at, counters=item.counters, final=item.final,
                               local=item.local, key=run_key(item.prefix))
                elif isinstance(item, RowsItem):
                    assert item.rows is not None, "the runner hands over materialized rows"
                    g = group("tracks", item.run, item.topic)
                    g.head.setdefault("timestamp", []).extend(item.stamps)
                    g.head.setdefault("_seq", []).extend([seq] * len(item.stamps))
                    g.rows.extend(item.rows)
                    if item.late:
                        g.late += len(item.stamps)
                elif isinstance(item, PointsItem):
                    g = group("metrics", item.run, item.name, item.folder)
                    g.head.setdefault("index", []).extend(range(item.first_index, item.first_index + len(item.points)))
                    g.rows.extend(merge.flatten(p) for p in item.points)
                elif isinstance(item, LogsItem):
                    g = group("logs", item.run, None)
                    h = g.head
                    h.setdefault("sequence", []).extend(range(item.first_seq, item.first_seq + len(item.entries)))
                    h.setdefault("timestamp", []).extend(round(e[0] * 1e6) for e in item.entries)
                    h.setdefault("level", []).extend(e[1] for e in item.entries)
                    h.setdefault("message", []).extend(e[2] for e in item.entries)
                    h.setdefault("metadata", []).extend(json_text(e[3]) if e[3] else None for e in item.entries)
                    g.rows.extend({} for _ in item.entries)
                elif isinstance(item, ParamsItem):
                    g = group("params", item.run, None)
                    g.head.setdefault("version", []).append(item.version)
                    g.head.setdefault("created_at", []).append(item.created_at)
                    g.rows.append(item.data)
                elif isinstance(item, MetaItem):
                    run = self._run(state, item.run)
                    kind = "tracks" if item.target == "track" else "metrics"
                    folder = "tracks" if item.target == "series" else "metrics"
                    s = self._series(run, kind, item.name, folder)
                    for k in ("description", "tags", "metadata"):
                        if k in item.info:
                            s[k] = item.info[k]
        objs: list[Obj] = []
        parts: dict[str, int] = {}
        for key in sorted(groups, key=lambda k: (k[0], k[1], k[3], "" if k[2] is None else k[2], k[2] is None)):
            objs.extend(self._objects(state, groups[key], lo, hi, parts))
        return objs

    def _objects(self, state: SinkState, g: _Group, lo: int, hi: int, parts: dict[str, int]) -> list[Obj]:
        import pyarrow as pa

        if not g.rows:
            return []
        run = self._run(state, g.run)
        kind = g.kind
        s = self._series(run, kind, g.name, g.folder) if kind in ("tracks", "metrics") else None
        tkey = kind if s is None else f"{kind}:{g.folder}:{g.name}"
        types: dict[str, str] = run["types"].setdefault(tkey, {})
        n = len(g.rows)
        cols: list[tuple[str, pa.Array[Any]]] = [("run", pa.array([run["prefix"]] * n, pa.string()))]
        if kind == "tracks":
            cols += [("name", pa.array([g.name] * n, pa.string())), ("timestamp", pa.array(g.head["timestamp"], pa.float64())),
                     ("_seq", pa.array(g.head["_seq"], pa.int64()))]
        elif kind == "metrics":
            cols += [("name", pa.array([g.name] * n, pa.string())), ("folder", pa.array([g.folder] * n, pa.string())),
                     ("index", pa.array(g.head["index"], pa.int64()))]
        elif kind == "logs":
            h = g.head
            cols += [("sequence", pa.array(h["sequence"], pa.int64())),
                     ("timestamp", pa.array(h["timestamp"], pa.timestamp("us", tz="UTC"))),
                     ("level", pa.array(h["level"], pa.string())), ("message", pa.array(h["message"], pa.string())),
                     ("metadata", pa.array(h["metadata"], pa.string()))]
        else:
            cols += [("version", pa.array(g.head["version"], pa.int64())),
                     ("created_at", pa.array(g.head["created_at"], pa.string()))]
        meta = {b"dashcar": orjson.dumps({"format": FORMAT, "writer": self.writer, "range": [lo, hi]})}
        try:
            cols += field_columns(g.rows, types, RESERVED[kind])
            table = pa.table(dict(cols)).replace_schema_metadata(meta)
            blobs = split_encode(table, self.roll_rows, self.roll_bytes)
        except (ValueError, TypeError, OverflowError, pa.ArrowException) as exc:
            # The same rows fail the same way on every retry: refused, so they never block the rest.
            self._refused.append(Rejected(f"{kind} of run {run['prefix']!r} cannot be archived: {exc}", g.items))
            return []
        where = f"run_dir={run['key']}" if s is None else f"run_dir={run['key']}/name_dir={series_key(kind, g.name)}"
        out = []
        for blob, rows in blobs:
            part = parts.get(f"{kind}/{where}", 0)
            parts[f"{kind}/{where}"] = part + 1
            key = self._key(kind, where, f"{lo:012d}-{hi:012d}-{self.writer}-{part:03d}.parquet")
            out.append(Obj(key, blob, kind, g.run, g.name, rows))
        run["objects"] += len(out)
        run["bytes"] += sum(len(o.data) for o in out)
        if s is not None:
            s["rows"] += n
            s["objects"] += len(out)
            if g.late:
                s["late_rows"] = s.get("late_rows", 0) + g.late
            if kind == "tracks":
                stamps = g.head["timestamp"]
                lo_ts, hi_ts = min(stamps), max(stamps)
                s["first_timestamp"] = lo_ts if s.get("first_timestamp") is None else min(s["first_timestamp"], lo_ts)
                s["last_timestamp"] = hi_ts if s.get("last_timestamp") is None else max(s["last_timestamp"], hi_ts)
        else:
            agg = run.setdefault(kind, {"rows": 0, "objects": 0})
            agg["rows"] += n
            agg["objects"] += len(out)
            if kind == "params":
                agg["version"] = max(g.head["version"])
        return out

    def _manifest(self, path: str) -> tuple[str, bytes]:
        """The run's manifest: who it is, its status and counters, and what the archive holds of it."""
        run = self.runs[path]
        series: dict[str, dict[str, Any]] = {"tracks": {}, "metrics": {}}
        for s in run["series"].values():
            entry = {k: v for k, v in s.items() if k not in ("kind", "name")}
            entry["name_dir"] = series_key(s["kind"], s["name"])
            label = s["name"] if s["name"] is not None else None
            series[s["kind"]][f"{s.get('folder', 'metrics')}:{label}" if "folder" in s else str(label)] = entry
        doc = {
            "format": FORMAT, "run": run["prefix"], "run_dir": run["key"], "writer": self.writer, "root": run["root"],
            "status": run["status"], "reason": run["reason"], "created_at": run["created_at"], "closed_at": run["closed_at"],
            "complete": bool(run["final"]), "local": run["local"], "info": run["info"], "counters": run["counters"],
            "objects": run["objects"], "bytes": run["bytes"], "tracks": series["tracks"], "metrics": series["metrics"],
            "logs": run.get("logs", {"rows": 0, "objects": 0}), "params": run.get("params", {"rows": 0, "objects": 0}),
            "files": {**run.get("file_counters", {}), "live": sum(1 for e in run.get("file_index", {}).values()
                                                                  if e["state"] == "live")},
            "file_events": run.get("file_events", {"rows": 0, "objects": 0}),
        }
        h = hashlib.blake2b(path.encode(), digest_size=4).hexdigest()
        data = orjson.dumps(doc, default=str, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
        return self._key("runs", f"run_dir={run['key']}", f"{self.writer}-{h}.json"), data

    # ---------------------------------------------------------------- files
    def _file_rel(self, run: dict[str, Any], item: FileItem) -> str:
        """A put's or copy's object key, relative to the URI: ``files/run_dir=<run>/<id>/<filename>``."""
        if item.op not in ("put", "copy"):
            return ""
        return f"files/run_dir={run['key']}/{key_name([item.id])}/{key_name([item.filename])}"

    def _ship_files(
        self, state: SinkState, plan: list[list[Any]], fops: list[tuple[int, int, list[_FileOp]]]
    ) -> list[tuple[list[str], list[Obj]]]:
        """Store the send's files, then make its ``file_events`` objects; per range, the keys of the
        file objects that landed and the event objects (to upload with the other tables).

        Every key a put or copy may write is in the committed plan before anything is sent, so a
        range skipped after a crash has its files deleted too; a key that ends up holding nothing
        (a lost file) leaves the plan and is deleted as the plan's dropped keys are.
        """
        store = self.store
        assert store is not None
        old = {(p[0], p[1]): p[2] for p in self.plan}
        interim: list[list[Any]] = []
        for (lo, hi, keys), (_, _, ops) in zip(plan, fops, strict=True):
            more = [self._key(op.rel) for op in ops
                    if op.rel and op.item.id not in self.runs[op.item.run].get("file_index", {})]
            merged = [*keys, *(k for k in more if k not in keys)]
            interim.append([lo, hi, [*merged, *(k for k in old.get((lo, hi), []) if k not in merged)]])
        if interim != self.plan:
            self.plan = interim
            self._commit_plan(state)
        results: dict[str, tuple[int, str, bool] | files.FileLost] = {}
        jobs: list[tuple[str, bytes, Callable[[], None]]] = []
        timeouts: list[float] = []
        for _, _, ops in fops:
            for op in ops:
                item = op.item
                key = self._key(op.rel)
                run = self.runs[item.run]
                if item.op != "put" or item.id in run.get("file_index", {}) or key in results:
                    continue
                memo = self._shipped.get(key)
                if memo is not None:
                    results[key] = memo
                    continue
                results[key] = files.FileLost("unreadable", "not read")  # replaced by the job
                local = None
                if item.source[0] == "path" and run.get("local", True):
                    with contextlib.suppress(ValueError):
                        local = stored_file_path(item.run, item.path, item.id, item.filename)
                jobs.append((key, _source_digest(item), _bound(self._put_file, store, key, item, local, results)))
                size = item.source[2] if item.source[0] == "path" else item.meta.get("size") or 0
                timeouts.append(self.uploads.timeout_s * (1 + int(size) // FILE_PART_BYTES))
        self.uploads.run(jobs, "file upload", timeouts)
        out: list[tuple[list[str], list[Obj]]] = []
        for i, (lo, hi, ops) in enumerate(fops):
            rows: dict[str, list[dict[str, Any]]] = {}
            landed: list[str] = []
            for op in ops:
                self._file_event(op, results, rows, landed)
            if i == len(fops) - 1:
                for path in sorted({op.item.run for _, _, o in fops for op in o}):
                    run = self.runs[path]
                    if run["final"]:
                        for p in run.pop("pending_copies", None) or ():
                            item = FileItem(*p[:9])
                            lost = files.FileLost("no_source", f"file {item.source[1]} to duplicate never came")
                            self._file_lost(_FileOp(item, p[9], p[10], ""), lost, rows)
            out.append((landed, self._event_objects(lo, hi, rows)))
        return out

    def _put_file(self, store: Store, key: str, item: FileItem, local: str | None,
                  results: dict[str, tuple[int, str, bool] | files.FileLost]) -> None:
        """Upload a put's bytes as ``key`` (on an upload thread), hashing them on the way; a source
        that changes while it is read is sent again (``files.COPY_TRIES``), then counted changed."""
        try:
            if item.source[0] == "inline":
                data = bytes(item.source[1])
                store.put(key, data)
                results[key] = (len(data), hashlib.sha256(data).hexdigest(), False)
                return
            for _ in range(files.COPY_TRIES):
                fd, changed = files.open_put_source(item.source, item.pid, item.meta.get("size"), local)
                try:
                    got, torn = store.put_stream(key, functools.partial(files.read_into, fd))
                finally:
                    os.close(fd)
                if not torn:
                    break
            results[key] = (got.size, got.checksum, changed or torn)
        except files.FileLost as lost:
            results[key] = lost

    def _count_file(self, run: str, name: str, n: int = 1) -> None:
        c = self.runs[run].setdefault("file_counters", {})
        c[name] = c.get(name, 0) + n
        self._file_counts.append((run, name, n))

    def _file_row(self, op: _FileOp, **fields: Any) -> dict[str, Any]:
        item = op.item
        meta = item.meta
        row: dict[str, Any] = {
            "run": self.runs[item.run]["prefix"], "op": item.op, "id": item.id, "path": item.path or None,
            "filename": item.filename or None, "time": round(float(meta["time"]) * 1e6) if "time" in meta else None,
            "_seq": op.seq, "_index": op.index,
        }
        if item.op in ("put", "copy"):
            row.update(content_type=meta.get("content_type") or files.DEFAULT_CONTENT_TYPE, description=meta.get("description"),
                       tags=_texts(meta.get("tags")) or [], bindrs=_texts(meta.get("bindrs")) or [],
                       metadata=None if meta.get("metadata") is None else json_text(meta["metadata"]))
        row.update(fields)
        return row

    def _file_lost(self, op: _FileOp, lost: files.FileLost, rows: dict[str, list[dict[str, Any]]]) -> None:
        item = op.item
        self._count_file(item.run, "files_lost")
        self._count_file(item.run, "files_lost_" + lost.reason)
        log.warning("sink=archive run=%s file=%s/%s id=%s lost reason=%s", item.run, item.path.rstrip("/"), item.filename,
                    item.id, lost)
        size = item.meta.get("size")
        rows.setdefault(item.run, []).append(self._file_row(op, lost=lost.reason, size=size if isinstance(size, int) else None))

    def _file_event(self, op: _FileOp, results: dict[str, tuple[int, str, bool] | files.FileLost],
                    rows: dict[str, list[dict[str, Any]]], landed: list[str]) -> None:
        """Apply one file operation to the run's file state, in order; its row goes to ``rows``."""
        item = op.item
        run = self.runs[item.run]
        index: dict[str, dict[str, Any]] = run.setdefault("file_index", {})
        names: dict[str, list[Any]] = run.setdefault("file_names", {})
        if item.op in ("update", "delete"):
            e = index.get(item.id)
            if e is not None and item.op == "delete" and e["state"] == "deleted":
                return
            if e is None or e["state"] != "live":
                self._count_file(item.run, "file_ops_no_target")
                log.warning("sink=archive run=%s file %s of a %s is not in the run (or deleted)", item.run, item.id, item.op)
                return
            where = {"path": e["path"], "filename": e["filename"], "object_key": e["key"]}
            if item.op == "delete":
                e["state"] = "deleted"
                nk = e["path"] + "\0" + e["filename"]
                if names.get(nk, [None])[0] == item.id:
                    del names[nk]
                rows.setdefault(item.run, []).append(self._file_row(op, **where))
                return
            given = [k for k in ("description", "tags", "metadata") if k in item.meta]
            m = item.meta
            rows.setdefault(item.run, []).append(self._file_row(
                op, **where, updated=given, description=m.get("description"),
                tags=_texts(m.get("tags")) if "tags" in m else None,
                metadata=None if m.get("metadata") is None else json_text(m["metadata"])))
            return
        if item.id in index:
            return  # the same call again (a producer re-sent it after an agent restart): stored once
        key = self._key(op.rel)
        extra: dict[str, Any] = {}
        if item.op == "put":
            got = results[key]
            if isinstance(got, files.FileLost):
                self._file_lost(op, got, rows)
                return
            self._shipped[key] = got
            size, checksum, changed = got
            origin = op.rel
            if changed:
                self._count_file(item.run, "files_changed_after_call")
                log.warning("sink=archive run=%s file=%s/%s changed between the call and its upload; shipped what was read",
                            item.run, item.path, item.filename)
                extra["changed_after_call"] = True
        else:
            sid = str(item.source[1])
            src = index.get(sid)
            if src is None and not run["final"]:
                # Its put may still come: a frame re-sent after an agent restart lands after later ones.
                run.setdefault("pending_copies", []).append([*item, op.seq, op.index])
                return
            if src is None or src["state"] not in ("live",):
                self._file_lost(op, files.FileLost("no_source", f"file {sid} to duplicate is not in the archive"), rows)
                return
            size, checksum, origin = src["size"], src["sha256"], src["origin"]
            if key not in self._shipped:
                failed: list[BaseException] = []
                job = _bound(_copy_object, self.store, self._key(origin), key, size, failed)
                self.uploads.run([(key, _digest(origin.encode()), job)], "file copy",
                                 [self.uploads.timeout_s * (1 + size // FILE_PART_BYTES)])
                if failed:
                    self._file_lost(op, files.FileLost("no_source", f"the archive holds no {origin}"), rows)
                    return
                self._shipped[key] = (size, checksum, False)
            extra["source_id"] = sid
        t = float(item.meta.get("time", 0.0))
        entry = {"key": op.rel, "origin": origin, "size": size, "sha256": checksum, "path": item.path,
                 "filename": item.filename, "state": "live"}
        nk = item.path + "\0" + item.filename
        live = names.get(nk)
        if live is not None and live[1] > t:
            entry["state"] = "superseded"  # a later call's file holds the name already: this one came late
            extra["superseded"] = True
        else:
            if live is not None:
                index[live[0]]["state"] = "replaced"
                extra["replaces"] = live[0]
            names[nk] = [item.id, t]
        index[item.id] = entry
        landed.append(key)
        self._count_file(item.run, "files_shipped")
        self._count_file(item.run, "file_bytes", size)
        rows.setdefault(item.run, []).append(self._file_row(op, object_key=op.rel, size=size, sha256=checksum, **extra))
        waiting = [p for p in run.get("pending_copies", ()) if p[6][1] == item.id]
        if waiting:
            run["pending_copies"] = [p for p in run["pending_copies"] if p[6][1] != item.id]
            for p in waiting:
                copy = FileItem(*p[:9])
                self._file_event(_FileOp(copy, p[9], p[10], self._file_rel(run, copy)), results, rows, landed)

    def _event_objects(self, lo: int, hi: int, rows: dict[str, list[dict[str, Any]]]) -> list[Obj]:
        """The ``file_events`` objects of one range, one series of parts per run."""
        import pyarrow as pa

        schema = file_events_schema()
        meta = {b"dashcar": orjson.dumps({"format": FORMAT, "writer": self.writer, "range": [lo, hi]})}
        out: list[Obj] = []
        for path in sorted(rows):
            run = self.runs[path]
            got = rows[path]
            table = pa.Table.from_pylist(got, schema=schema).replace_schema_metadata(meta)
            try:
                blobs = split_encode(table, self.roll_rows, self.roll_bytes)
            except (ValueError, pa.ArrowException) as exc:
                self._refused.append(Rejected(f"file events of run {run['prefix']!r} cannot be archived: {exc}", []))
                continue
            where = f"run_dir={run['key']}"
            made = [Obj(self._key("file_events", where, f"{lo:012d}-{hi:012d}-{self.writer}-{part:03d}.parquet"),
                        blob, "file_events", path, None, n) for part, (blob, n) in enumerate(blobs)]
            agg = run.setdefault("file_events", {"rows": 0, "objects": 0})
            agg["rows"] += len(got)
            agg["objects"] += len(made)
            run["objects"] += len(made)
            run["bytes"] += sum(len(o.data) for o in made)
            out.extend(made)
        return out

    # ---------------------------------------------------------------- after
    def committed(self, batches: list[Batch]) -> None:
        """Forget runs whose final manifest is stored (their state stays, for a run opened again)."""
        self.plan = []
        self._shipped.clear()
        for run, name, n in self._file_counts:
            self.counters[name] = self.counters.get(name, 0) + n
            if name.startswith("files_lost_"):
                reason = name[len("files_lost_"):]
                self.files_lost_by_reason[reason] = self.files_lost_by_reason.get(reason, 0) + n
                self.files_lost_by_run[run] = self.files_lost_by_run.get(run, 0) + n
        self._file_counts = []
        for path in self._final:
            self.runs.pop(path, None)
        self._final = set()

    def interrupt(self) -> None:
        """The agent stops: a send waiting on uploads gives up now (its batches stay in the WAL)."""
        self.uploads.stopping.set()

    def unfinished(self) -> int:
        """Uploads past their deadline still running (only the process's exit ends them; the next start redoes them)."""
        return self.uploads.running()

    def close(self) -> None:
        """Uploads past their deadline are left to end on their own threads."""
        self.uploads.stopping.set()

    def status(self) -> dict[str, Any]:
        """Where the archive goes, what it wrote, and uploads still running past their deadline."""
        return {"uri": self.target.describe(), "writer": self.writer, **self.counters,
                "files_lost_by_reason": dict(self.files_lost_by_reason), "files_lost_by_run": dict(self.files_lost_by_run),
                "abandoned_uploads": self.uploads.running(), "planned_objects": sum(len(p[2]) for p in list(self.plan))}


def _bound(fn: Callable[..., None], *args: Any) -> Callable[[], None]:
    return lambda: fn(*args)


def _source_digest(item: FileItem) -> bytes:
    """What an upload of a put sends, as far as is known before reading it (for ``Uploads.busy``)."""
    if item.source[0] == "inline":
        return _digest(bytes(item.source[1]))
    return _digest(orjson.dumps(item.source))


def _copy_object(store: Store, src: str, dst: str, size: int, failed: list[BaseException]) -> None:
    try:
        store.copy(src, dst, size)
    except FileNotFoundError as exc:
        failed.append(exc)
