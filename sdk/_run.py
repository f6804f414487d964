"""Run naming: the process-wide ``RUN`` defaults, prefix templates, run ids and ``exp.run``.

A prefix may hold template fields, resolved when the prefix is given or set. Each field is an
attribute of the run, spelled ``{field}`` or ``{EXP.field}``, with an optional format spec:

    {EXP.id}        the run's id: a 64-bit snowflake (ms since 2024-01-01, pid, sequence)
    {EXP.name}      the last part of the run's current prefix (none before a prefix is set)
    {EXP.owner}     first part; {EXP.project}: second part, or RUN.project before a prefix
    {EXP.date}      RUN.now as YYYYMMDD; {EXP.datetime_str}: YYYYMMDD.HHMMSS
    {now:%Y-%m-%d}  RUN.now with any strftime format (RUN.now: when dashcar was imported)
    {job_counter}   how many Experiments this process made before this one (the first gets 0)
    {user}, {job_name}, {path_stem}   RUN.user, RUN.job_name, the entry script's path stem

ML-Dash 0.11 resolves ``{EXP.*}`` only when a prefix is set after construction and the plain
fields only at construction (elsewhere they stay in the folder name as written); it loses the
id it put in a prefix at construction and cannot resolve ``{EXP.name}`` there. dashcar
resolves every field in both places and keeps the id. ``Experiment()`` without a prefix
derives one from ``RUN.prefix`` (default ``{project}/{now:%Y/%m-%d}/{path_stem}/{job_name}``)
when the run first needs it, so ``RUN`` settings made after creating it still apply.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar

if TYPE_CHECKING:
    from ._experiment import Experiment

R = TypeVar("R")

DEFAULT_PREFIX: Final = "{project}/{now:%Y/%m-%d}/{path_stem}/{job_name}"
DEFAULT_PROJECT: Final = "{user}/scratch"
DEFAULT_JOB_NAME: Final = "{now:%H.%M.%S}/{job_counter:03d}"
PROJECT_ROOT_FILES: Final = ("pyproject.toml", "requirements.txt", "setup.py", "setup.cfg")
INTERACTIVE_STEM: Final = "interactive"
"""``path_stem`` of a run made where no script file exists (``python -c``, a REPL, a notebook)."""
TEMPLATE_FIELDS: Final = (
    "id", "name", "owner", "project", "user", "now", "date", "datetime_str", "job_counter", "job_name", "path_stem",
)
MAX_TEMPLATE_DEPTH: Final = 4
SNOWFLAKE_EPOCH_MS: Final = 1_704_067_200_000
"""2024-01-01 UTC, the epoch of ML-Dash's snowflake ids."""

_IMPORTED_AT: Final = time.time()
_id_seq = itertools.count()


def new_run_id() -> int:
    """A snowflake id: 41 bits of ms since 2024-01-01, 10 bits of pid, 12 of sequence."""
    ms = int(time.time() * 1000) - SNOWFLAKE_EPOCH_MS
    return (ms << 22) | ((os.getpid() & 0x3FF) << 12) | (next(_id_seq) & 0xFFF)


def _caller_file() -> str | None:
    """The file of the first caller outside dashcar and importlib, or None (REPL, ``-c``)."""
    frame = sys._getframe(1)
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        internal = module == "dashcar" or module.startswith(("dashcar.", "importlib"))
        if not internal and not frame.f_code.co_filename.startswith("<frozen"):
            file = frame.f_globals.get("__file__")
            return os.path.abspath(file) if isinstance(file, str) else None
        frame = frame.f_back  # type: ignore[assignment]
    return None


def find_project_root(entry: str) -> str:
    """The nearest directory above ``entry`` holding a project file (pyproject.toml, ...), else the cwd."""
    d = os.path.dirname(os.path.abspath(entry))
    while True:
        if any(os.path.exists(os.path.join(d, name)) for name in PROJECT_ROOT_FILES):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return os.getcwd()
        d = parent


def path_stem(entry: str | None, project_root: str | None) -> str:
    """``entry`` relative to its project root, without extension: ``experiments/train``."""
    if entry is None:
        return INTERACTIVE_STEM
    root = project_root if project_root is not None else find_project_root(entry)
    rel = os.path.relpath(os.path.abspath(entry), root)
    if rel.startswith(".."):
        rel = os.path.basename(entry)
    return os.path.splitext(rel)[0].replace(os.sep, "/")


def _user_from(environ: Mapping[str, str]) -> str:
    """``$ML_DASH_USER``, else ``$USER``, else the login name, as ML-Dash resolves ``RUN.user``."""
    name = environ.get("ML_DASH_USER") or environ.get("USER")
    if name:
        return name
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "local"


def _text(value: object, setting: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"RUN.{setting} must be a str (or None for the default), got {type(value).__name__}")


_RUN_SETTINGS: Final = ("user", "project", "prefix", "job_name", "job_counter", "now", "entry", "project_root")


class RunConfig:
    """``RUN``: process-wide defaults that new runs start from, as ML-Dash's ``RUN``.

    Set them before creating (or, for a derived prefix, before starting) a run:
    ``RUN.project = "alice/robotics"``, ``RUN.prefix = "{project}/{EXP.date}/{job_counter}"``.
    Setting a name it does not know raises ``AttributeError``; ``None`` restores a default.
    """

    __slots__ = ("_user", "_project", "_prefix", "_job_name", "_job_counter", "_now", "_entry", "_project_root")
    _user: str | None
    _project: str | None
    _prefix: str | None
    _job_name: str | None
    _job_counter: int
    _now: datetime | None
    _entry: str | None
    _project_root: str | None

    def __init__(self) -> None:
        for slot in self.__slots__:
            object.__setattr__(self, slot, None)
        object.__setattr__(self, "_job_counter", 0)

    def __setattr__(self, name: str, value: object) -> None:
        if name not in _RUN_SETTINGS:
            raise AttributeError(f"RUN has no setting {name!r}; the settings are {', '.join(_RUN_SETTINGS)}")
        object.__setattr__(self, name, value)

    @property
    def user(self) -> str:
        """Owner of derived prefixes: set, else ``$ML_DASH_USER``, ``$USER``, the login name."""
        return self._user if self._user is not None else _user_from(os.environ)

    @user.setter
    def user(self, value: str | None) -> None:
        object.__setattr__(self, "_user", _text(value, "user"))

    @property
    def project(self) -> str:
        """Project part of derived prefixes; default ``{user}/scratch``."""
        return self._project if self._project is not None else DEFAULT_PROJECT

    @project.setter
    def project(self, value: str | None) -> None:
        object.__setattr__(self, "_project", _text(value, "project"))

    @property
    def prefix(self) -> str:
        """Template of a run made without a prefix: set, else ``$ML_DASH_PREFIX``, else the default."""
        if self._prefix is not None:
            return self._prefix
        return os.environ.get("ML_DASH_PREFIX") or DEFAULT_PREFIX

    @prefix.setter
    def prefix(self, value: str | None) -> None:
        object.__setattr__(self, "_prefix", _text(value, "prefix"))

    @property
    def job_name(self) -> str:
        """Last parts of the default prefix; default ``{now:%H.%M.%S}/{job_counter:03d}``."""
        return self._job_name if self._job_name is not None else DEFAULT_JOB_NAME

    @job_name.setter
    def job_name(self, value: str | None) -> None:
        object.__setattr__(self, "_job_name", _text(value, "job_name"))

    @property
    def job_counter(self) -> int:
        """The ``{job_counter}`` the next run gets; every new Experiment adds one."""
        return self._job_counter

    @job_counter.setter
    def job_counter(self, value: int) -> None:
        if type(value) is not int or value < 0:
            raise TypeError(f"RUN.job_counter must be an int >= 0, got {value!r}")
        object.__setattr__(self, "_job_counter", value)

    @property
    def now(self) -> datetime:
        """The session's time for ``{now:...}`` and ``{EXP.date}``: when ``dashcar`` was imported."""
        return self._now if self._now is not None else datetime.fromtimestamp(_IMPORTED_AT)

    @now.setter
    def now(self, value: datetime | None) -> None:
        if value is not None and not isinstance(value, datetime):
            raise TypeError(f"RUN.now must be a datetime, got {type(value).__name__}")
        object.__setattr__(self, "_now", value)

    @property
    def entry(self) -> str | None:
        """The script ``{path_stem}`` names; None means each run's creator (``RUN.entry = __file__``)."""
        return self._entry

    @entry.setter
    def entry(self, value: str | os.PathLike[str] | None) -> None:
        object.__setattr__(self, "_entry", None if value is None else os.path.abspath(os.fspath(value)))

    @property
    def project_root(self) -> str | None:
        """Where ``{path_stem}`` is relative to; None searches up from the entry for pyproject.toml & co."""
        return self._project_root

    @project_root.setter
    def project_root(self, value: str | os.PathLike[str] | None) -> None:
        object.__setattr__(self, "_project_root", None if value is None else os.path.abspath(os.fspath(value)))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in _RUN_SETTINGS)
        return f"RUN({shown})"


RUN: Final = RunConfig()
"""The process-wide run defaults (``from dashcar import RUN``, as ``from ml_dash import RUN``)."""


def split_prefix(prefix: str) -> tuple[str | None, str, str]:
    """``(owner, project, name)`` of a prefix: ``owner/project/.../name``; ``workspace/name`` is a project."""
    parts = prefix.split("/")
    if len(parts) == 1:
        return None, parts[0], parts[0]
    return parts[0], parts[1] if len(parts) > 2 else parts[0], parts[-1]


class _Fields:
    """The namespace a template is formatted with: ``{field}`` and ``{EXP.field}``."""

    __slots__ = ("_run", "_depth")

    def __init__(self, run: RunContext, depth: int) -> None:
        self._run = run
        self._depth = depth

    def __getitem__(self, key: str) -> object:
        if key == "EXP":
            return _ExpFields(self._run, self._depth)
        return self._run._field(key, self._depth)


class _ExpFields(_Fields):
    __slots__ = ()

    def __getattr__(self, name: str) -> object:
        return self._run._field(name, self._depth)


def resolve_template(template: str, run: RunContext, depth: int = 0) -> str:
    """``template`` with every field filled from ``run``; ``ValueError`` names a field it cannot fill."""
    if "{" not in template and "}" not in template:
        return template
    if depth > MAX_TEMPLATE_DEPTH:
        raise ValueError(f"prefix template {template!r}: RUN.project and RUN.job_name refer to each other in a loop")
    try:
        return template.format_map(_Fields(run, depth))
    except ValueError as exc:
        if str(exc).startswith("prefix template"):
            raise
        raise ValueError(f"prefix template {template!r}: {exc}") from exc
    except (KeyError, AttributeError, TypeError, IndexError) as exc:
        raise ValueError(f"prefix template {template!r}: {exc}; fields are {', '.join(TEMPLATE_FIELDS)}") from exc


_RUN_ATTRIBUTES: Final = frozenset(TEMPLATE_FIELDS) | {"prefix", "entry"}


class RunContext:
    """``exp.run``: the run's prefix and names, and its lifecycle.

    A context manager (``with exp.run as exp:``), a decorator (``@exp.run`` passes the run as
    ``experiment=``), and ``start/complete/fail/cancel``. ``prefix`` may be set (with template
    fields) until the run starts; any other attribute set raises ``AttributeError``.
    """

    __slots__ = ("_exp", "_job_counter", "_id", "_now", "_user", "_caller", "_stem")
    _exp: Experiment
    _job_counter: int
    _id: int | None
    _now: datetime | None
    _user: str | None
    _caller: str | None
    _stem: str | None

    def __init__(self, exp: Experiment) -> None:
        object.__setattr__(self, "_exp", exp)
        object.__setattr__(self, "_job_counter", RUN.job_counter)
        RUN.job_counter = RUN.job_counter + 1
        for slot in ("_id", "_now", "_user", "_stem"):
            object.__setattr__(self, slot, None)
        object.__setattr__(self, "_caller", _caller_file())

    def __setattr__(self, name: str, value: object) -> None:
        if name == "prefix":
            object.__setattr__(self, name, value)
        elif name in _RUN_ATTRIBUTES:
            hint = f", or RUN.{name} before making the run" if name in _RUN_SETTINGS else ""
            raise AttributeError(f"exp.run.{name} is read-only; set exp.run.prefix before the run starts{hint}")
        else:
            raise AttributeError(f"exp.run has no attribute {name!r}; only exp.run.prefix can be set, before the run starts")

    @property
    def prefix(self) -> str:
        """The run's ``owner/project/.../name``; settable, with template fields, until the run starts."""
        return self._exp.prefix

    @prefix.setter
    def prefix(self, value: str) -> None:
        exp = self._exp
        if exp._open:
            raise RuntimeError(
                f"cannot change the prefix of run {exp._prefix!r} after it started; "
                "set exp.run.prefix before exp.run.start() or the with block"
            )
        if not isinstance(value, str):
            raise TypeError(f"exp.run.prefix must be a str, got {type(value).__name__}")
        exp._set_prefix(resolve_template(value, self))

    @property
    def name(self) -> str:
        """The last part of the prefix."""
        return split_prefix(self._exp.prefix)[2]

    @property
    def owner(self) -> str | None:
        """The first part of the prefix (None for a one-part prefix)."""
        return split_prefix(self._exp.prefix)[0]

    @property
    def project(self) -> str:
        """The second part of the prefix (the first of a two-part ``workspace/name``)."""
        return split_prefix(self._exp.prefix)[1]

    @property
    def id(self) -> int:
        """The run's snowflake id, made on first use (or by ``{EXP.id}``) and then fixed."""
        if self._id is None:
            object.__setattr__(self, "_id", new_run_id())
        assert self._id is not None
        return self._id

    @property
    def now(self) -> datetime:
        """``RUN.now`` as this run first read it."""
        if self._now is None:
            object.__setattr__(self, "_now", RUN.now)
        assert self._now is not None
        return self._now

    @property
    def date(self) -> str:
        """``now`` as ``YYYYMMDD``."""
        return self.now.strftime("%Y%m%d")

    @property
    def datetime_str(self) -> str:
        """``now`` as ``YYYYMMDD.HHMMSS``."""
        return self.now.strftime("%Y%m%d.%H%M%S")

    @property
    def job_counter(self) -> int:
        """This run's ``{job_counter}``: how many Experiments this process made before it."""
        return self._job_counter

    @property
    def user(self) -> str:
        """``RUN.user`` as this run first read it."""
        if self._user is None:
            object.__setattr__(self, "_user", RUN.user)
        assert self._user is not None
        return self._user

    @property
    def entry(self) -> str | None:
        """The script ``{path_stem}`` names: ``RUN.entry``, else the file that made this run."""
        return RUN.entry if RUN.entry is not None else self._caller

    @property
    def path_stem(self) -> str:
        """``entry`` relative to its project root, without extension (``interactive`` if no file)."""
        if self._stem is None:
            object.__setattr__(self, "_stem", path_stem(self.entry, RUN.project_root))
        assert self._stem is not None
        return self._stem

    def _field(self, key: str, depth: int) -> object:
        """One template field; the prefix-derived ones come from the prefix set so far."""
        if key not in TEMPLATE_FIELDS:
            raise ValueError(f"unknown field {key!r}; fields are {', '.join(TEMPLATE_FIELDS)} (also as EXP.<field>)")
        current = self._exp._prefix or None
        if key in ("name", "owner") or (key == "project" and current is not None):
            if current is None:
                raise ValueError(f"{{EXP.{key}}} comes from the run's current prefix, and it has none yet; "
                                 "give a prefix first, then set exp.run.prefix to the template")
            value = split_prefix(current)[("owner", "project", "name").index(key)]
            if value is None:
                raise ValueError(f"{{EXP.{key}}}: prefix {current!r} has no owner part")
            return value
        if key == "project":
            return resolve_template(RUN.project, self, depth + 1)
        if key == "job_name":
            return resolve_template(RUN.job_name, self, depth + 1)
        return getattr(self, key)

    def start(self) -> Experiment:
        """Open the run (idempotent) and return the experiment."""
        return self._exp.start()

    def complete(self) -> None:
        """Close the run as completed."""
        self._exp.complete()

    def fail(self, reason: str | None = None) -> None:
        """Close the run as failed."""
        self._exp.fail(reason)

    def cancel(self) -> None:
        """Close the run as cancelled."""
        self._exp.cancel()

    def __enter__(self) -> Experiment:
        return self._exp.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._exp._close_for(ev)

    def __call__(self, func: Callable[..., R]) -> Callable[..., R]:
        """``@exp.run``: run ``func`` inside this run, passing the experiment as ``experiment=``."""

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> R:
            with self as experiment:
                kwargs["experiment"] = experiment
                return func(*args, **kwargs)

        return wrapper

    def __repr__(self) -> str:
        return f"<run {self._exp._prefix or '(prefix derived when first needed)'}>"
