"""A run's files in ML-Dash's layout: the bytes under ``files/``, the index, exactly once.

Layout (ML-Dash 0.11, local mode): ``files/<path>/<id>/<filename>`` and the index
``files/.files_metadata.json`` (``{"files": [entry, ...]}``, entries in ``ENTRY_KEYS`` order),
changed only under ``flock`` on ``files/.files_metadata.lock``, the lock ML-Dash takes.

Order of a put (or copy), each step idempotent by the file's id, so a replay after a crash at
any point lands the file once:

1. the bytes go to ``<id>/.<filename>.partial`` (hashed on the way), fsync, rename to
   ``<filename>``, fsync the directory; a spool file is hard-linked instead (O(1), same
   inode: the SDK never writes it again), a final file already there is only hashed;
2. the index: under the lock, read, apply the entry (a live entry of the same path and name
   is replaced in place, as ML-Dash overwrites), write a temporary file, fsync, rename;
3. the replaced entry's id directory is removed (its path is first committed to the sink's
   state, so a crash between 2 and 3 still removes it at recovery).

An index that already holds the id skips the put. Sources are only read: a caller's file
(``path``) is opened read-only, never moved or deleted; a spool file is linked, and deleted by
the core once every sink has passed it. A source that vanished or cannot be read is a loss
(``FileLost``) that the sink counts per run with its reason.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, Final, NamedTuple

from dashcar.proto import FILES_INDEX, FILES_LOCK, files_dir, split_name

from . import layout

log = logging.getLogger(__name__)

ENTRY_KEYS: Final = (
    "id", "experimentId", "path", "filename", "description", "tags", "bindrs", "contentType", "sizeBytes", "checksum",
    "metadata", "uploadedAt", "updatedAt", "deletedAt",
)
"""An index entry's keys, in the order ML-Dash writes them."""
CHUNK: Final = 1 << 20
COPY_TRIES: Final = 3
"""A caller's file that changes while it is copied is copied again, at most this many times."""
DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"
LOSS_REASONS: Final = ("vanished", "unreadable", "not_regular", "not_owner", "no_source")
"""Why a file's bytes could not be stored: the source was gone, could not be read, was no regular
file, belonged to another user than the producer's, or (``duplicate``) the file to copy was not there."""


class FileLost(Exception):
    """A file's bytes could not be had; ``reason`` is one of ``LOSS_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class Stored(NamedTuple):
    """What landed: size and SHA-256 of the stored bytes; ``changed``: the source changed after the call."""

    size: int
    checksum: str
    changed: bool = False


def experiment_id(prefix: str, project: str | None) -> str:
    """``experimentId`` as ML-Dash's local writer sets it: ``<project>/<prefix>``."""
    if not project:
        parts = prefix.split("/")
        project = parts[1] if len(parts) > 2 else parts[0]
    return f"{project}/{prefix}"


def new_entry(file_id: str, exp_id: str, path: str, filename: str, meta: dict[str, Any], stored: Stored) -> dict[str, Any]:
    """An index entry with ML-Dash's keys, in its order and formats."""
    at = layout.iso(float(meta["time"]))
    return {
        "id": file_id, "experimentId": exp_id, "path": path, "filename": filename, "description": meta.get("description"),
        "tags": list(meta.get("tags") or []), "bindrs": list(meta.get("bindrs") or []),
        "contentType": meta.get("content_type") or DEFAULT_CONTENT_TYPE, "sizeBytes": stored.size, "checksum": stored.checksum,
        "metadata": meta.get("metadata"), "uploadedAt": at, "updatedAt": at, "deletedAt": None,
    }


def index_path(run: str) -> str:
    """``<run>/files/.files_metadata.json``."""
    return os.path.join(files_dir(run), FILES_INDEX)


def read_index(run: str) -> list[dict[str, Any]]:
    """The run's index entries (empty if there is no index yet, or it cannot be read)."""
    doc = layout.read_json(index_path(run))
    files = doc.get("files") if isinstance(doc, dict) else None
    return [e for e in files if isinstance(e, dict)] if isinstance(files, list) else []


def id_dir(run: str, path: str, file_id: str) -> str:
    """``<run>/files/<path>/<id>``."""
    parts = split_name(path.strip("/"), "file path") if path.strip("/") else ()
    return os.path.join(files_dir(run), *parts, file_id)


@contextlib.contextmanager
def locked_index(run: str) -> Iterator[list[dict[str, Any]]]:
    """The index entries under ML-Dash's lock; the caller writes them back with ``write_index``.

    An index that exists but does not parse (ML-Dash rewrites it in place, so a crash of an
    ML-Dash writer can tear it) is moved aside, not silently dropped.
    """
    d = files_dir(run)
    with layout.locked(os.path.join(d, FILES_LOCK)):
        path = index_path(run)
        doc = layout.read_json(path)
        if doc is None and os.path.exists(path):
            aside = f"{path}.damaged-{int(time.time())}"
            os.replace(path, aside)
            log.error("file index %s does not parse; moved to %s and started anew", path, aside)
        files = doc.get("files") if isinstance(doc, dict) else None
        yield [e for e in files if isinstance(e, dict)] if isinstance(files, list) else []


def write_index(run: str, entries: list[dict[str, Any]]) -> None:
    """Replace the index (call inside ``locked_index``): temporary file, fsync, rename, fsync the dir."""
    layout.write_atomic(index_path(run), layout.dumps({"files": entries}), durable=True)


def _parse_iso(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.rstrip("Z"))
    except ValueError:
        return None


def called_before(entry: dict[str, Any], other: dict[str, Any]) -> bool:
    """True if ``entry`` comes from a call made before ``other``'s (by ``uploadedAt``; unknown: no)."""
    a, b = _parse_iso(entry.get("uploadedAt")), _parse_iso(other.get("uploadedAt"))
    return a is not None and b is not None and a < b


def live_entry(entries: list[dict[str, Any]], path: str, filename: str) -> int | None:
    """Index of the live entry stored as ``path``/``filename``, as ML-Dash's overwrite finds it."""
    for i, e in enumerate(entries):
        if e.get("path") == path and e.get("filename") == filename and e.get("deletedAt") is None:
            return i
    return None


# ------------------------------------------------------------------ the bytes
def _partial(dest: str) -> str:
    return os.path.join(os.path.dirname(dest), "." + os.path.basename(dest) + ".partial")


def _make_dirs(d: str) -> None:
    """Create ``d`` and fsync the parent of each directory made, so the new entries survive a power cut."""
    if os.path.isdir(d):
        return
    _make_dirs(os.path.dirname(d))
    try:
        os.mkdir(d)
    except FileExistsError:
        return
    layout.fsync_dir(os.path.dirname(d))


def _finish(fd: int, partial: str, dest: str) -> None:
    os.fsync(fd)
    os.close(fd)
    os.replace(partial, dest)
    layout.fsync_dir(os.path.dirname(dest))


def hash_file(path: str) -> Stored:
    """Size and SHA-256 of a stored file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return Stored(size, h.hexdigest())


def store_bytes(data: bytes, dest: str) -> Stored:
    """Write ``data`` as ``dest`` (partial file, fsync, rename)."""
    _make_dirs(os.path.dirname(dest))
    partial = _partial(dest)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        layout.pwrite_all(fd, data, 0)
    except BaseException:
        os.close(fd)
        raise
    _finish(fd, partial, dest)
    return Stored(len(data), hashlib.sha256(data).hexdigest())


def _spool_entry(spool: str) -> tuple[int, str]:
    """The spool dir's fd (the caller closes it) and the file's name, once the dir and the file are
    known to be real (no symlink at ``files``, ``.incoming`` or the file) and the file regular.

    :raises FileLost: the spool dir or file vanished, is no regular file, or cannot be opened.
    """
    spool_dir, name = os.path.split(spool)
    try:
        files_fd = os.open(os.path.dirname(spool_dir), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            dir_fd = os.open(os.path.basename(spool_dir), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=files_fd)
        finally:
            os.close(files_fd)
    except FileNotFoundError as exc:
        raise FileLost("vanished", f"spool dir {spool_dir}: {exc.strerror}") from exc
    except OSError as exc:
        raise FileLost("not_regular" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else "unreadable",
                       f"spool dir {spool_dir}: {exc.strerror}") from exc
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError as exc:
        os.close(dir_fd)
        raise FileLost("vanished", f"spool file {spool}") from exc
    if not stat.S_ISREG(st.st_mode):
        os.close(dir_fd)
        raise FileLost("not_regular", f"spool file {spool} is no regular file")
    return dir_fd, name


def store_spool(spool: str, dest: str, size: int | None) -> Stored:
    """Link (else copy) a spool file to ``dest``; the spool dir and file must be real, not symlinks."""
    _make_dirs(os.path.dirname(dest))
    dir_fd, name = _spool_entry(spool)
    try:
        try:
            os.link(name, dest, src_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            os.unlink(dest)
            os.link(name, dest, src_dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            src = _open_source(name, dir_fd, spool)
            return _copy_fd(src, dest, None)[0]
        stored = hash_file(dest)
        fd = os.open(dest, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        layout.fsync_dir(os.path.dirname(dest))
        return stored._replace(changed=size is not None and stored.size != size)
    finally:
        os.close(dir_fd)


def _open_source(name: str, dir_fd: int | None, shown: str) -> int:
    """Open a source read-only without blocking on a FIFO; it must be a regular file."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | (os.O_NOFOLLOW if dir_fd is not None else 0)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError as exc:
        raise FileLost("vanished", f"{shown}: {exc.strerror}") from exc
    except OSError as exc:
        raise FileLost("unreadable", f"{shown}: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileLost("not_regular", f"{shown} is no regular file")
    return fd


def _uid_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def may_read(st: os.stat_result, pid: int) -> bool:
    """A caller's file is read with its producer's rights: the agent's own user's producer may hand it any
    file the agent can read; another user's producer (a shared agent) only a file of its own."""
    me = os.getuid()
    owner = _uid_of(pid)
    if owner is None:
        return st.st_uid == me
    return owner == me or st.st_uid == owner


def store_path(source: list[Any], dest: str, pid: int) -> Stored:
    """Copy a caller's file to ``dest`` while hashing it; ``changed`` if it is not what it was at the call.

    ``source`` is ``["path", abspath, size, mtime_ns, ino, dev]``. A file that changes while
    it is copied is copied again (``COPY_TRIES``); what is stored is what was read, with the
    checksum of those bytes, so the index never lies about the stored file.
    """
    _, abspath, size, mtime_ns, ino, dev = source
    fd = _open_source(abspath, None, abspath)
    st = os.fstat(fd)
    if not may_read(st, pid):
        os.close(fd)
        raise FileLost("not_owner", f"{abspath} belongs to uid {st.st_uid}, not to the producer's user")
    changed = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev) != (size, mtime_ns, ino, dev)
    _make_dirs(os.path.dirname(dest))
    stored, torn = _copy_fd(fd, dest, COPY_TRIES)
    return stored._replace(changed=changed or torn)


def _copy_fd(src: int, dest: str, tries: int | None) -> tuple[Stored, bool]:
    """Copy the open file ``src`` (closed here) to ``dest`` with its hash; with ``tries``, again while it
    changes during the copy. Read errors are losses; write errors raise ``OSError`` (retried later)."""
    partial = _partial(dest)
    out = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        attempt = 0
        while True:
            pos = 0

            def write(chunk: bytes) -> None:
                nonlocal pos
                layout.pwrite_all(out, chunk, pos)
                pos += len(chunk)

            stored, torn = read_into(src, write)
            attempt += 1
            if not torn or tries is None or attempt >= tries:
                break
            os.ftruncate(out, 0)
        os.ftruncate(out, stored.size)
    except BaseException:
        os.close(out)
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    finally:
        os.close(src)
    _finish(out, partial, dest)
    return stored, torn


def store_put(source: list[Any], dest: str, size: int | None, pid: int) -> Stored:
    """Store a put's bytes as ``dest`` from its source: ``["inline", bytes]``, ``["spool", abspath]``
    or the caller's ``["path", ...]`` (read with producer ``pid``'s rights)."""
    if source[0] == "inline":
        return store_bytes(source[1], dest)
    if source[0] == "spool":
        return store_spool(source[1], dest, size)
    return store_path(source, dest, pid)


def store_copy(source: str, dest: str) -> Stored:
    """``duplicate``: link (else copy) a stored file to ``dest``; stored files are never written again."""
    _make_dirs(os.path.dirname(dest))
    try:
        os.link(source, dest)
    except FileExistsError:
        pass
    except FileNotFoundError as exc:
        raise FileLost("no_source", f"{source}: {exc.strerror}") from exc
    except OSError:
        return _copy_fd(_open_source(source, None, source), dest, None)[0]
    layout.fsync_dir(os.path.dirname(dest))
    return hash_file(dest)


# ------------------------------------------------------------------ remote sinks: reading a put's bytes
def open_spool(spool: str) -> int:
    """Open a spool file read-only, not following a symlink at ``files``, ``.incoming`` or the file.

    :raises FileLost: the spool dir or file vanished, is no regular file, or cannot be read.
    """
    dir_fd, name = _spool_entry(spool)
    try:
        return _open_source(name, dir_fd, spool)
    finally:
        os.close(dir_fd)


def open_put_source(source: list[Any], pid: int, size: int | None, stored: str | None = None) -> tuple[int, bool]:
    """Open a put's ``spool`` or ``path`` source for a remote sink: the fd (read-only) and whether
    it is not what it was at the call (a path's ``stat``, a spool file's size).

    For a ``path`` source, ``stored`` (the run's local copy, ``proto.stored_file_path``) is read
    instead when it is there: the bytes the local index describes, whatever the caller did to its
    file since. Either file must pass ``may_read`` for producer ``pid``, as ``store_path`` checks.

    :raises FileLost: the source vanished, is no regular file, cannot be read, or is not the producer's to hand over.
    """
    if source[0] == "spool":
        fd = open_spool(source[1])
        return fd, size is not None and os.fstat(fd).st_size != size
    _, abspath, call_size, mtime_ns, ino, dev = source
    if stored is not None:
        try:
            fd = os.open(stored, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW)
        except OSError:
            pass
        else:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and may_read(st, pid):
                return fd, st.st_size != call_size
            os.close(fd)
    fd = _open_source(abspath, None, abspath)
    st = os.fstat(fd)
    if not may_read(st, pid):
        os.close(fd)
        raise FileLost("not_owner", f"{abspath} belongs to uid {st.st_uid}, not to the producer's user")
    return fd, (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev) != (call_size, mtime_ns, ino, dev)


def read_into(fd: int, write: Callable[[bytes], object]) -> tuple[Stored, bool]:
    """Read the open file ``fd`` from its start into ``write`` in ``CHUNK`` pieces, hashing it; the
    size and SHA-256 of what was read, and whether the file changed while it was read (torn).

    ``fd`` stays open. A read error is a loss (``FileLost``); what ``write`` raises goes through.
    """
    before = os.fstat(fd)
    h = hashlib.sha256()
    pos = 0
    while True:
        try:
            chunk = os.pread(fd, CHUNK, pos)
        except OSError as exc:
            raise FileLost("unreadable", f"reading at {pos}: {exc.strerror}") from exc
        if not chunk:
            break
        write(chunk)
        h.update(chunk)
        pos += len(chunk)
    after = os.fstat(fd)
    torn = (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or after.st_size != pos
    return Stored(pos, h.hexdigest()), torn
