"""``exp.files``: ML-Dash 0.11's file API (upload, ``save_*``, list, download, delete, ...).

A write never copies a large file on the caller's thread. Content of at most
``FILE_INLINE_MAX_BYTES`` (64 KiB) travels inside its frame: read (``upload``) or serialised
(``save_*``) on the call, so a later change by the caller cannot reach it. Above that,
``save_*`` serialise into a spool file in the run's ``files/.incoming/`` (the bytes must be
taken from the object now; the agent then links the file into place), and ``upload`` of a
larger file tries a copy-on-write clone into the spool (constant time on btrfs, XFS) and
otherwise hands the agent the path with its ``stat``: the agent copies it, and if the file
changed in between it stores what it read (with its checksum) and counts
``files_changed_after_call``. ``upload(..., copy=True)`` copies on the call instead. The
caller's files are never moved or deleted.

Ids are made here, so a call returns its entry at once (``"checksum": None`` and ``"status":
"queued"`` until the agent wrote it) and ``duplicate(result)`` works on a file still queued.
Reads (``list``, ``download``, ``exists``, ``read_text``) first wait until the agent wrote
what this thread sent, then read the index ML-Dash reads.
"""

from __future__ import annotations

import builtins
import importlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from dashcar.proto import (
    FILE_INLINE_MAX_BYTES,
    FILES_INDEX,
    ConfigError,
    Kind,
    check_file_name,
    file_dir,
    file_dir_parts,
    spool_dir,
)

from ._run import new_run_id, split_prefix

if TYPE_CHECKING:
    from ._experiment import Experiment

MAX_FILE_BYTES: Final = 100 * 1024**3
"""ML-Dash's limit for one file (100 GB)."""
DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"
FICLONE: Final = 0x40049409
"""``ioctl`` that clones a file's extents (copy-on-write) on btrfs, XFS and bcachefs."""
_BUILDER_OPTIONS: Final = frozenset({"prefix", "description", "tags", "bindrs", "metadata", "file_id", "file_path", "dest_path"})


def content_type(name: str) -> str:
    """``mimetypes.guess_type`` of ``name``, as ML-Dash sets ``contentType``."""
    import mimetypes

    return mimetypes.guess_type(name)[0] or DEFAULT_CONTENT_TYPE


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, lowercase hex (ML-Dash's ``checksum``)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def split_to(base: str, to: str) -> tuple[str, str]:
    """``(logical dir, file name)`` of a target ``to`` under directory ``base``: a directory in ``to``
    is appended (ML-Dash drops it in ``save_torch``/``save_pkl``/``save_image``/``save_fig``/``save_video``)."""
    head, _, name = to.strip().lstrip("/").rpartition("/")
    if not name:
        raise ValueError(f"invalid target {to!r}: it must end with a file name")
    check_file_name(name)
    path = file_dir(base.rstrip("/") + "/" + head if head else base)
    return path, name


_no_clone: set[tuple[int, int]] = set()
"""(source device, spool device) pairs where cloning failed: not tried again in this process."""


def _clone(src: str, dst: str, src_dev: int) -> bool:
    """A copy-on-write clone of ``src`` as ``dst`` (constant time), if the file system can."""
    import fcntl

    try:
        dst_dev = os.stat(os.path.dirname(dst)).st_dev
        if (src_dev, dst_dev) in _no_clone:
            return False
        with open(src, "rb") as s, open(dst, "xb") as d:
            try:
                fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
                return True
            except OSError:
                if len(_no_clone) < 1024:
                    _no_clone.add((src_dev, dst_dev))
        os.unlink(dst)
    except OSError:
        pass
    return False


def _as_ubyte(frames: Any) -> Any:
    """Frames as uint8, as scikit-image's ``img_as_ubyte`` converts them (floats in [0, 1] scaled by 255)."""
    import numpy as np

    a = np.asarray(frames)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype.kind == "f":
        if a.min() < -1.0 or a.max() > 1.0:
            raise ValueError("float video frames must lie in [-1, 1] (as img_as_ubyte wants); scale them first")
        return np.rint(np.clip(a, 0.0, 1.0) * 255).astype(np.uint8)
    if a.dtype.kind == "u":
        return (a >> (8 * a.dtype.itemsize - 8)).astype(np.uint8)
    if a.dtype.kind == "i":
        return (np.clip(a, 0, None) >> (8 * a.dtype.itemsize - 9)).astype(np.uint8)
    raise ValueError(f"cannot make video frames of dtype {a.dtype}")


class FilesAccessor:
    """``exp.files``: ``exp.files("models")`` gives a ``FileBuilder``; direct calls need no directory."""

    __slots__ = ("_exp", "_sent")

    def __init__(self, exp: Experiment) -> None:
        self._exp = exp
        self._sent: set[str] = set()
        """Ids this process sent (a ``duplicate`` of one of them needs no look-up)."""

    def __call__(self, dir: str | None = None, **options: Any) -> FileBuilder:
        """A builder for directory ``dir`` (or a file path, for ``download``/``exists``/``delete``)."""
        return FileBuilder(self, dir, **options)

    def upload(self, fpath: str | os.PathLike[str], *, to: str | None = None, **options: Any) -> dict[str, Any]:
        """Upload a file; ``to`` may hold a directory (``to="models/best.pt"``)."""
        return FileBuilder(self, None, **options).upload(fpath, to=to)

    def download(self, path: str, *, to: str | None = None) -> str | list[str]:
        """Download one file (``"models/m.pt"``) or every match of a pattern (``"images/*.png"``) into ``to``."""
        prefix, pattern = _split_pattern(path)
        if pattern is None:
            return FileBuilder(self, path.lstrip("/")).download(to=to)
        return FileBuilder(self, prefix).download(pattern, to=to)

    def delete(self, path: str) -> dict[str, Any] | list[dict[str, Any]]:
        """Delete (softly) one file or every match of a pattern."""
        prefix, pattern = _split_pattern(path)
        if pattern is None:
            return FileBuilder(self, path.lstrip("/")).delete()
        return FileBuilder(self, prefix).delete(pattern)

    def list(self, pattern: str | None = None) -> list[dict[str, Any]]:
        """Every live file of the run, optionally matching ``pattern`` (name or path)."""
        return FileBuilder(self, None).list(pattern)

    def save_text(self, content: str, *, to: str) -> dict[str, Any]:
        """Save text (UTF-8) as ``to``."""
        return FileBuilder(self, None).save_text(content, to=to)

    def save_json(self, content: Any, *, to: str) -> dict[str, Any]:
        """Save ``content`` as JSON (indent 2) as ``to``."""
        return FileBuilder(self, None).save_json(content, to=to)

    def save_blob(self, data: bytes, *, to: str) -> dict[str, Any]:
        """Save bytes as ``to``."""
        return FileBuilder(self, None).save_blob(data, to=to)

    def __repr__(self) -> str:
        return f"<files of {self._exp!r}>"


def _split_pattern(path: str) -> tuple[str | None, str | None]:
    """``"images/*.png"`` → ``("images", "*.png")``; a path without wildcards → ``(None, None)``."""
    path = path.lstrip("/")
    if "*" not in path and "?" not in path:
        return None, None
    parts = path.split("/")
    first = next(i for i, p in enumerate(parts) if "*" in p or "?" in p)
    return ("/".join(parts[:first]) or None), "/".join(parts[first:])


class FileBuilder:
    """File operations in one directory (or on one file path), as ML-Dash's ``FileBuilder``.

    Options (all optional): ``description``, ``tags``, ``bindrs``, ``metadata`` for what is
    stored; ``file_id`` for ``update``/``download``/``delete`` by id; ``prefix`` (ML-Dash's
    deprecated spelling of the directory), ``file_path`` (for ``save()``), ``dest_path``.
    """

    __slots__ = ("_files", "_exp", "_path", "_base", "_description", "_tags", "_bindrs", "_metadata", "_file_id", "_file_path",
                 "_dest_path")

    def __init__(self, files: FilesAccessor, path: str | None = None, **options: Any) -> None:
        unknown = set(options) - _BUILDER_OPTIONS
        if unknown:
            raise TypeError(f"exp.files() got unknown options {sorted(unknown)}; it takes {sorted(_BUILDER_OPTIONS)}")
        if path is not None and not isinstance(path, str):
            raise TypeError(f"exp.files(dir) takes a str, got {type(path).__name__}")
        self._files = files
        self._exp = files._exp
        self._path = path.strip("/") if path else None
        prefix = options.get("prefix")
        self._base = file_dir(self._path if self._path else (prefix or "/"))
        self._description: str | None = options.get("description")
        self._tags: builtins.list[str] | None = options.get("tags")
        self._bindrs: builtins.list[str] = list(options.get("bindrs") or [])
        self._metadata: dict[str, Any] | None = options.get("metadata")
        self._file_id: str | None = options.get("file_id")
        self._file_path: str | None = options.get("file_path")
        self._dest_path: str | None = options.get("dest_path")

    # ------------------------------------------------------------------ writing
    def upload(
        self, fpath: str | os.PathLike[str], *, to: str | None = None, description: str | None = None,
        tags: builtins.list[str] | None = None, metadata: dict[str, Any] | None = None, copy: bool = False,
    ) -> dict[str, Any]:
        """Upload an existing file (named ``to``, which may hold a directory, or its own name).

        At most 64 KiB is read now; a larger file is cloned (copy-on-write) or handed over by
        path. ``copy=True`` copies it now, for a caller who rewrites it at once. A run without
        local files (``dash_root=None``) has no spool: a larger file is always read by the agent.
        """
        if not fpath:
            raise ValueError("fpath is required")
        src = os.fspath(fpath)
        try:
            st = os.stat(src)
        except FileNotFoundError:
            raise ValueError(f"File not found: {src}") from None
        if not os.path.isfile(src):
            raise ValueError(f"Path is not a file: {src}")
        if st.st_size > MAX_FILE_BYTES:
            raise ValueError(f"File size ({st.st_size} bytes) exceeds 100GB limit")
        path, name = split_to(self._base, to) if to else (self._base, check_file_name(os.path.basename(src)))
        meta = self._meta(description, tags, metadata, content_type(src))
        file_id = str(new_run_id())
        if st.st_size <= FILE_INLINE_MAX_BYTES:
            with open(src, "rb") as f:
                data = f.read(FILE_INLINE_MAX_BYTES + 1)
            if len(data) <= FILE_INLINE_MAX_BYTES:
                return self._put(file_id, path, name, ["inline", data], meta, len(data))
        if not self._exp._local:
            # A run without local files has no spool: the agent reads the file itself.
            source = ["path", os.path.abspath(src), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]
            return self._put(file_id, path, name, source, meta, st.st_size)
        spool = self._spool_path(file_id)
        if copy:
            import shutil

            shutil.copyfile(src, spool)
            return self._put(file_id, path, name, ["spool", file_id], meta, os.path.getsize(spool), spool)
        if _clone(src, spool, st.st_dev):
            return self._put(file_id, path, name, ["spool", file_id], meta, os.path.getsize(spool), spool)
        absolute = os.path.abspath(src)
        source = ["path", absolute, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]
        return self._put(file_id, path, name, source, meta, st.st_size)

    def save(
        self, content: Any = None, *, to: str | None = None, description: str | None = None,
        tags: builtins.list[str] | None = None, metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Save by type: an existing path uploads, bytes → ``save_blob``, dict/list → ``save_json``, an array → ``save_image``."""
        if description is not None:
            self._description = description
        if tags is not None:
            self._tags = tags
        if metadata is not None:
            self._metadata = metadata
        if content is None:
            if not self._file_path:
                raise ValueError("No content provided and no file_path set in constructor")
            content = self._file_path
        if isinstance(content, (str, os.PathLike)) and Path(content).exists():
            return self.upload(content, to=to)
        kind: str | None = None
        if isinstance(content, (bytes, bytearray)):
            kind = "bytes"
        elif isinstance(content, (dict, builtins.list)):
            kind = "dict/list"
        elif type(content).__name__ == "ndarray" and type(content).__module__ == "numpy":
            kind = "numpy arrays"
        if kind is None:
            raise ValueError(f"Unsupported content type: {type(content)}. Expected str (file path), bytes, dict, list, "
                             "or numpy.ndarray.")
        if not to:
            raise ValueError(f"'to' parameter is required when saving {kind}")
        if kind == "bytes":
            return self.save_blob(bytes(content), to=to)
        if kind == "dict/list":
            return self.save_json(content, to=to)
        return self.save_image(content, to=to)

    def save_json(self, content: Any, *, to: str) -> dict[str, Any]:
        """``json.dump(content, indent=2)`` as ``to``."""
        import json

        return self._save_bytes(json.dumps(content, indent=2).encode(), to)

    def save_text(self, content: str, *, to: str) -> dict[str, Any]:
        """Text, UTF-8, as ``to``."""
        return self._save_bytes(content.encode("utf-8"), to)

    def save_blob(self, data: bytes, *, to: str) -> dict[str, Any]:
        """Bytes as ``to``."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"save_blob takes bytes, got {type(data).__name__}")
        return self._save_bytes(bytes(data), to)

    def save_pkl(self, content: Any, *, to: str) -> dict[str, Any]:
        """``pickle.dump(content)`` (default protocol) as ``to``."""
        import pickle

        return self._save_bytes(pickle.dumps(content), to)

    def save_torch(self, model: Any, *, to: str) -> dict[str, Any]:
        """``torch.save(model)`` (a model or a state dict) as ``to``, written straight into the spool."""
        try:
            torch = importlib.import_module("torch")
        except ImportError:
            raise ImportError("save_torch needs PyTorch: pip install torch") from None
        return self._save_with(lambda path: torch.save(model, path), to)

    def save_image(self, array: Any, *, to: str, quality: int = 95) -> dict[str, Any]:
        """A numpy array as an image (PNG, JPEG, ... by ``to``'s extension), converted as ML-Dash does."""
        try:
            import numpy as np
            from PIL import Image
        except ImportError:
            raise ImportError("PIL/Pillow is required for saving images. Install it with: pip install Pillow") from None
        if array.dtype == np.uint8:
            img = Image.fromarray(array)
        elif array.max() <= 1.0:
            img = Image.fromarray((array * 255).astype(np.uint8))
        else:
            img = Image.fromarray(((array - array.min()) / (array.max() - array.min()) * 255).astype(np.uint8))
        ext = os.path.splitext(to)[1].lower()
        kwargs: dict[str, Any] = {}
        if ext in (".jpg", ".jpeg"):
            if img.mode in ("RGBA", "LA", "P"):
                background = Image.new("RGB", img.size, (255, 255, 255))
                if img.mode == "P":
                    img = img.convert("RGBA")
                background.paste(img, mask=img.split()[-1] if img.mode in ("RGBA", "LA") else None)
                img = background
            elif img.mode not in ("RGB", "L"):
                img = img.convert("RGB")
            kwargs = {"quality": quality, "optimize": True}
        import io

        image_format = Image.registered_extensions().get(ext)
        if image_format is None:
            raise ValueError(f"save_image: unknown image extension {ext!r} in {to!r}; use .png, .jpg, ...")
        buf = io.BytesIO()
        img.save(buf, format=image_format, **kwargs)
        return self._save_bytes(buf.getvalue(), to)

    def save_fig(self, fig: Any = None, *, to: str, **savefig_kwargs: Any) -> dict[str, Any]:
        """``fig.savefig(**savefig_kwargs)`` (default: the current figure) as ``to``, then closes the figure."""
        try:
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("Matplotlib is not installed. Install it with: pip install matplotlib") from None
        if fig is None:
            fig = plt.gcf()
        ext = os.path.splitext(to)[1].lstrip(".").lower()
        if ext and "format" not in savefig_kwargs:
            savefig_kwargs["format"] = ext
        import io

        buf = io.BytesIO()
        fig.savefig(buf, **savefig_kwargs)
        plt.close(fig)
        return self._save_bytes(buf.getvalue(), to)

    def save_video(self, frame_stack: Any, *, to: str, fps: int = 20, **imageio_kwargs: Any) -> dict[str, Any]:
        """Frames (a list of arrays or a stacked array) as a video with imageio (mp4 needs imageio-ffmpeg)."""
        try:
            import imageio.v3 as iio
        except ImportError:
            raise ImportError("save_video needs imageio: pip install imageio imageio-ffmpeg") from None
        try:
            if len(frame_stack) == 0:
                raise ValueError("frame_stack is empty")
        except TypeError:
            raise ValueError("frame_stack must be a list or numpy array") from None
        frames = _as_ubyte(frame_stack)
        ext = os.path.splitext(to)[1].lower()
        if ext == ".gif" and "duration" not in imageio_kwargs:
            imageio_kwargs["duration"] = 1000.0 / fps
        else:
            imageio_kwargs["fps"] = fps
        return self._save_with(lambda path: iio.imwrite(path, frames, extension=ext, **imageio_kwargs), to)

    def duplicate(self, source: str | dict[str, Any], to: str) -> dict[str, Any]:
        """A new file ``to`` (``"models/latest.pt"``) with the bytes of ``source`` (an id, or the dict a call returned)."""
        if isinstance(source, str):
            source_id = source
        elif isinstance(source, dict) and "id" in source:
            source_id = source["id"]
        else:
            raise ValueError("source must be a file ID (str) or metadata dict with 'id' key")
        if not source_id:
            raise ValueError("Invalid source: file ID is empty")
        found: dict[str, Any] = source if isinstance(source, dict) else {}
        if source_id not in self._files._sent:
            found = next((e for e in self._live() if e.get("id") == source_id), {})
            if not found:
                raise FileNotFoundError(f"File {source_id} not found")
        path, name = split_to("/", to)
        meta = self._meta(None, None, None, content_type(name))
        file_id = str(new_run_id())
        entry = self._entry(file_id, path, name, meta, found.get("sizeBytes"))
        entry["checksum"] = found.get("checksum")
        if self._exp._emit(Kind.FILE_COPY, [file_id, source_id, path, name, meta]) != 0:
            self._files._sent.add(file_id)
        return entry

    def update(self) -> dict[str, Any]:
        """Replace the description, tags or metadata given to ``exp.files(file_id=..., ...)`` (only those given)."""
        if not self._file_id:
            raise ValueError("file_id is required for update() operation")
        entry = next((e for e in self._live() if e.get("id") == self._file_id), None)
        if entry is None:
            raise FileNotFoundError(f"File {self._file_id} not found")
        fields: dict[str, Any] = {}
        if self._description is not None:
            fields["description"] = self._description
        if self._tags is not None:
            fields["tags"] = list(self._tags)
        if self._metadata is not None:
            fields["metadata"] = self._metadata
        now = time.time()
        self._exp._emit(Kind.FILE_UPDATE, [self._file_id, fields, now])
        return {**entry, **fields, "updatedAt": _iso(now)}

    def delete(self, pattern: str | None = None) -> dict[str, Any] | builtins.list[dict[str, Any]]:
        """Soft-delete this file (by path or ``file_id``), or every match of ``pattern`` in this directory."""
        if self._file_id:
            if not any(e.get("id") == self._file_id for e in self._live()):
                raise FileNotFoundError(f"File {self._file_id} not found")
            return self._delete(self._file_id)
        if pattern:
            matches = self.list(pattern)
            if not matches:
                raise ValueError(f"No files found matching pattern: {pattern}")
            return [self._delete(e["id"]) for e in matches]
        return self._delete(self._find()["id"])

    # ------------------------------------------------------------------ reading
    def list(self, pattern: str | None = None) -> builtins.list[dict[str, Any]]:
        """Live files under this directory (whole path parts: ``files("model")`` does not list ``/models``),
        optionally those whose name or ``dir/name`` matches ``pattern``; tags given to ``files()`` filter too."""
        files = self._live()
        if self._path or self._base != "/":
            base = self._base
            files = [f for f in files if f.get("path") == base or str(f.get("path", "")).startswith(base + "/")]
        if self._tags:
            wanted = set(self._tags)
            files = [f for f in files if wanted.intersection(f.get("tags") or [])]
        if pattern:
            import fnmatch

            pattern = pattern.lstrip("/")
            files = [f for f in files if fnmatch.fnmatch(f.get("filename", ""), pattern)
                     or fnmatch.fnmatch(_full_path(f), pattern)]
        return files

    def download(self, pattern: str | None = None, *, to: str | os.PathLike[str] | None = None) -> str | builtins.list[str]:
        """Copy this file (or every match of ``pattern``, into directory ``to``) out of the run, checksum verified."""
        if self._file_id:
            entry = next((e for e in self._live() if e.get("id") == self._file_id), None)
            if entry is None:
                raise FileNotFoundError(f"File {self._file_id} not found")
            return self._copy_out(entry, to if to is not None else self._dest_path)
        if pattern:
            matches = self.list(pattern)
            if not matches:
                raise ValueError(f"No files found matching pattern: {pattern}")
            dest = Path(to) if to else Path(".")
            dest.mkdir(parents=True, exist_ok=True)
            return [self._copy_out(e, dest / e["filename"]) for e in matches]
        return self._copy_out(self._find(), to)

    def exists(self) -> bool:
        """True if a live file has this path (``dir/name``) or this bare name."""
        if not self._path:
            raise ValueError("No file path specified. Use: experiment.files('path/to/file').exists()")
        return self._lookup(self._path) is not None

    def read_text(self, encoding: str = "utf-8") -> str:
        """This file's content as text (checksum verified)."""
        if not self._path:
            raise ValueError("No file path specified. Use: experiment.files('path/to/file').read_text()")
        import hashlib

        entry = self._find()
        data = self._stored(entry).read_bytes()
        if entry.get("checksum") and hashlib.sha256(data).hexdigest() != entry["checksum"]:
            raise ValueError(f"Checksum verification failed for file {entry['id']}")
        return data.decode(encoding)

    # ---------------------------------------------------------------- internals
    def _meta(self, description: str | None, tags: builtins.list[str] | None, metadata: dict[str, Any] | None,
              ctype: str) -> dict[str, Any]:
        return {
            "time": time.time(),
            "description": description if description is not None else self._description,
            "tags": list(tags if tags is not None else (self._tags or [])),
            "bindrs": list(self._bindrs),
            "metadata": metadata if metadata is not None else self._metadata,
            "content_type": ctype,
        }

    def _entry(self, file_id: str, path: str, name: str, meta: dict[str, Any], size: int | None) -> dict[str, Any]:
        prefix = self._exp.prefix
        at = _iso(meta["time"])
        return {
            "id": file_id, "experimentId": f"{split_prefix(prefix)[1]}/{prefix}", "path": path, "filename": name,
            "description": meta["description"], "tags": meta["tags"], "bindrs": meta["bindrs"],
            "contentType": meta["content_type"],
            "sizeBytes": size, "checksum": None, "metadata": meta["metadata"], "uploadedAt": at, "updatedAt": at,
            "deletedAt": None, "status": "queued",
        }

    def _put(self, file_id: str, path: str, name: str, source: builtins.list[Any], meta: dict[str, Any], size: int,
             spool: str | None = None) -> dict[str, Any]:
        meta["size"] = size
        entry = self._entry(file_id, path, name, meta, size)
        if self._exp._emit(Kind.FILE_PUT, [file_id, path, name, source, meta]) == 0:
            entry["status"] = "dropped"
            if spool is not None:
                os.unlink(spool)
        else:
            self._files._sent.add(file_id)
        return entry

    def _spool_path(self, file_id: str) -> str:
        self._exp.start()
        if not self._exp._local:
            raise ConfigError(
                f"run {self._exp.prefix!r} keeps no local files (dash_root=None): content over "
                f"{FILE_INLINE_MAX_BYTES} bytes has no spool to wait in. Write it to a file and upload() that, "
                "or give the run a dash_root"
            )
        d = spool_dir(str(self._exp.run_dir))
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, file_id)

    def _save_bytes(self, data: bytes, to: str) -> dict[str, Any]:
        path, name = split_to(self._base, to)
        meta = self._meta(None, None, None, content_type(name))
        file_id = str(new_run_id())
        if len(data) <= FILE_INLINE_MAX_BYTES:
            return self._put(file_id, path, name, ["inline", data], meta, len(data))
        spool = self._spool_path(file_id)
        with open(spool, "xb") as f:
            f.write(data)
        return self._put(file_id, path, name, ["spool", file_id], meta, len(data), spool)

    def _save_with(self, write: Callable[[str], object], to: str) -> dict[str, Any]:
        """Let ``write(path)`` make the file in the spool; small results go inline after all."""
        path, name = split_to(self._base, to)
        meta = self._meta(None, None, None, content_type(name))
        file_id = str(new_run_id())
        spool = self._spool_path(file_id)
        try:
            write(spool)
        except BaseException:
            if os.path.exists(spool):
                os.unlink(spool)
            raise
        size = os.path.getsize(spool)
        if size <= FILE_INLINE_MAX_BYTES:
            with open(spool, "rb") as f:
                data = f.read()
            os.unlink(spool)
            return self._put(file_id, path, name, ["inline", data], meta, len(data))
        return self._put(file_id, path, name, ["spool", file_id], meta, size, spool)

    def _delete(self, file_id: str) -> dict[str, Any]:
        now = time.time()
        self._exp._emit(Kind.FILE_DELETE, [file_id, now])
        return {"id": file_id, "deletedAt": _iso(now)}

    def _live(self) -> builtins.list[dict[str, Any]]:
        """The run's live index entries, after the agent wrote what this thread sent."""
        self._exp._barrier()
        doc = _read_index(self._exp.run_dir)
        return [e for e in doc if e.get("deletedAt") is None]

    def _lookup(self, path: str) -> dict[str, Any] | None:
        """The live file at ``dir/name``, else the first with that bare name (ML-Dash takes the first of
        either, so ``files("config.json")`` could find ``configs/config.json`` before the root's)."""
        want = path.lstrip("/")
        entries = self._live()
        exact = next((e for e in entries if _full_path(e) == want), None)
        return exact if exact is not None else next((e for e in entries if e.get("filename") == want), None)

    def _find(self) -> dict[str, Any]:
        if not self._path:
            raise ValueError("No file path or pattern specified")
        entry = self._lookup(self._path)
        if entry is None:
            raise ValueError(f"File not found: {self._path}")
        return entry

    def _stored(self, entry: dict[str, Any]) -> Path:
        return self._exp.run_dir.joinpath("files", *file_dir_parts(entry.get("path", "/")), entry["id"], entry["filename"])

    def _copy_out(self, entry: dict[str, Any], to: str | os.PathLike[str] | None) -> str:
        import shutil

        dest = os.fspath(to) if to is not None else entry["filename"]
        shutil.copy2(self._stored(entry), dest)
        if entry.get("checksum") and sha256_file(dest) != entry["checksum"]:
            os.remove(dest)
            raise ValueError(f"Checksum verification failed for file {entry['id']}")
        return dest

    def __repr__(self) -> str:
        return f"<files {self._base} of {self._exp!r}>"


def _full_path(entry: dict[str, Any]) -> str:
    return (str(entry.get("path", "/")).rstrip("/") + "/" + str(entry.get("filename", ""))).lstrip("/")


def _read_index(run_dir: Path) -> list[dict[str, Any]]:
    import json

    try:
        with open(run_dir / "files" / FILES_INDEX, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return []
    files = doc.get("files") if isinstance(doc, dict) else None
    return [e for e in files if isinstance(e, dict)] if isinstance(files, list) else []


def _iso(t: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, timezone.utc).replace(tzinfo=None).isoformat() + "Z"
