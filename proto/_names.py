"""Naming rules of the on-disk layout: the only place that turns names into paths.

A prefix, topic or metric name is split on ``/``; every part must be a usable file name
(non-empty, not ``.`` or ``..``, no NUL or backslash, at most ``MAX_NAME_BYTES``), so no
name can produce a path outside the run directory.
"""

from __future__ import annotations

import functools
import os
from typing import Final

from ._constants import MAX_NAME_BYTES, MAX_NAME_PARTS
from ._errors import InvalidName


def split_name(name: object, what: str) -> tuple[str, ...]:
    """Split a ``/``-separated name into validated parts, or raise ``InvalidName``."""
    if not isinstance(name, str):
        raise InvalidName(f"{what} must be a str, got {type(name).__name__}")
    return _split(name, what)


@functools.lru_cache(maxsize=8192)
def _split(name: str, what: str) -> tuple[str, ...]:
    parts = tuple(name.split("/"))
    if len(parts) > MAX_NAME_PARTS:
        raise InvalidName(f"{what} {name!r} has more than {MAX_NAME_PARTS} parts")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidName(f"{what} {name!r} has an empty, '.' or '..' part; use names like 'a/b'")
        if "\x00" in part or "\\" in part:
            raise InvalidName(f"{what} {name!r} contains NUL or a backslash")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise InvalidName(f"{what} {name!r} has a part longer than {MAX_NAME_BYTES} bytes")
    return parts


def check_prefix(prefix: object) -> str:
    """Validate a run prefix (``owner/project/.../name``) and return it."""
    if not isinstance(prefix, str):
        raise InvalidName(f"run prefix must be a str, got {type(prefix).__name__}")
    _split(prefix, "run prefix")
    return prefix


def track_dir_name(topic: object) -> str:
    """Directory of a track topic, as ML-Dash names it: ``robot/state`` → ``robot_state``."""
    return "_".join(split_name(topic, "track topic"))


UNNAMED_METRIC_DIR: Final = "None"
"""Folder of the unnamed metric (``exp.metrics.log(...)``), where ML-Dash's reader looks for it."""


def metric_dir_parts(name: object) -> tuple[str, ...]:
    """Path parts of a metric directory under ``metrics/``; ``None`` is the unnamed metric.

    The name ``"None"`` is refused: it would share the unnamed metric's folder.
    """
    if name is None:
        return (UNNAMED_METRIC_DIR,)
    if name == UNNAMED_METRIC_DIR:
        raise InvalidName("metric name 'None' is the folder of the unnamed metric (exp.metrics.log(...)); choose another")
    return split_name(name, "metric name")


def check_root(root: object) -> str:
    """Validate a data root: an absolute, normalised path without NUL."""
    if not isinstance(root, str) or not root:
        raise InvalidName("data root must be a non-empty str")
    return _check_root(root)


@functools.lru_cache(maxsize=1024)
def _check_root(root: str) -> str:
    if "\x00" in root or not os.path.isabs(root) or os.path.normpath(root) != root:
        raise InvalidName(f"data root {root!r} must be an absolute, normalised path")
    return root


@functools.lru_cache(maxsize=8192)
def run_dir(root: str, prefix: str) -> str:
    """The run directory for a validated root and prefix."""
    return os.path.join(check_root(root), *split_name(prefix, "run prefix"))


FILES_DIR: Final = "files"
"""A run's files live under ``<run>/files/``, as ML-Dash lays them out."""
FILES_INDEX: Final = ".files_metadata.json"
FILES_LOCK: Final = ".files_metadata.lock"
SPOOL_DIR: Final = ".incoming"
"""Under ``files/``: content the SDK serialised for the agent (``save_*`` above the inline size),
owned by the agent once the frame is sent; ML-Dash's reader never looks there (it reads the index)."""
MAX_FILE_ID_CHARS: Final = 64


def file_dir_parts(path: object) -> tuple[str, ...]:
    """Parts of a file's logical directory (``/models/best`` → ``("models", "best")``; ``/`` → ``()``).

    Leading and trailing slashes are optional; every part follows the naming rules, and the
    first may not be the spool directory's name.
    """
    if not isinstance(path, str):
        raise InvalidName(f"file path must be a str, got {type(path).__name__}")
    inner = path.strip("/")
    if not inner:
        return ()
    parts = _split(inner, "file path")
    if parts[0] == SPOOL_DIR:
        raise InvalidName(f"file path {path!r}: {SPOOL_DIR!r} is where the agent keeps incoming files; choose another")
    return parts


def file_dir(path: object) -> str:
    """The logical directory as stored in the index: ``/`` or ``/a/b`` (no trailing slash)."""
    return "/" + "/".join(file_dir_parts(path))


def check_file_name(name: object, what: str = "file name") -> str:
    """A stored file's name (or a file id, or a spool name): one valid path part."""
    if not isinstance(name, str):
        raise InvalidName(f"{what} must be a str, got {type(name).__name__}")
    parts = _split(name, what)
    if len(parts) != 1:
        raise InvalidName(f"{what} {name!r} must be a single name, without '/'")
    return name


def check_file_id(file_id: object) -> str:
    """A file id: one valid name of at most ``MAX_FILE_ID_CHARS`` characters (dashcar makes digits)."""
    check_file_name(file_id, "file id")
    assert isinstance(file_id, str)
    if len(file_id) > MAX_FILE_ID_CHARS:
        raise InvalidName(f"file id {file_id[:20]!r}... is longer than {MAX_FILE_ID_CHARS} characters")
    return file_id


def files_dir(run: str) -> str:
    """``<run>/files``."""
    return os.path.join(run, FILES_DIR)


def spool_dir(run: str) -> str:
    """``<run>/files/.incoming``: where the SDK leaves serialised content for the agent."""
    return os.path.join(run, FILES_DIR, SPOOL_DIR)


def stored_file_path(run: str, path: str, file_id: str, filename: str) -> str:
    """Where a file lands: ``<run>/files/<path>/<id>/<filename>``, as ML-Dash stores it."""
    return os.path.join(run, FILES_DIR, *file_dir_parts(path), check_file_id(file_id), check_file_name(filename))
