"""Where a run ships: the ML-Dash server's URL and the token, resolved as ``ml_dash`` 0.11 resolves them.

Called when a run is made or started, never at import and never on the hot path: the token
stores are read once per run start (the keyring and ``cryptography`` only if installed and
needed). The agent does the talking; the producer only hands it the URL and the token.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

log = logging.getLogger("dashcar")

DEFAULT_API_URL: Final = "https://api.dash.ml"
"""What ``dash_url=True`` means without ``ML_DASH_API_URL`` (ML-Dash's default)."""
TOKEN_KEY: Final = "ml-dash-token"
TOKEN_ENV: Final = "DASHCAR_DASH_TOKEN"
REMOTE_ROOT: Final = "/.dashcar-remote"
"""Root of the frames of a run that keeps no local files: ``<this>/<quoted server URL>``, never written."""


def api_url(dash_url: str | bool, environ: Mapping[str, str]) -> str:
    """The server URL of ``dash_url`` (``True``: ``$ML_DASH_API_URL``, else ML-Dash's default), without a trailing ``/``."""
    from urllib.parse import urlsplit

    url = (environ.get("ML_DASH_API_URL") or DEFAULT_API_URL) if dash_url is True else dash_url
    if not isinstance(url, str):
        raise ValueError(f"dash_url must be a URL or True, got {dash_url!r}")
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"dash_url={dash_url!r} is not an http(s) URL; use e.g. dash_url='https://api.dash.ml'")
    return url


def remote_root(url: str) -> str:
    """The data root that names a remote-only run in its frames (unique per server, never a directory)."""
    from urllib.parse import quote

    return f"{REMOTE_ROOT}/{quote(url, safe='')}"


def _read_tokens(path: Path, data: bytes) -> str | None:
    try:
        tokens: Any = json.loads(data)
    except ValueError:
        log.warning("dashcar: %s is not readable JSON; no ML-Dash token taken from it", path)
        return None
    value = tokens.get(TOKEN_KEY) if isinstance(tokens, dict) else None
    return value if isinstance(value, str) and value else None


def find_token(environ: Mapping[str, str]) -> str | None:
    """The token for the ML-Dash server, or None: ``$DASHCAR_DASH_TOKEN``, else where ``ml_dash`` keeps it.

    ``ml_dash``'s order (``auth/token_storage.py`` ``load_token``): the OS keyring (service
    ``ml-dash``, only if the ``keyring`` package is installed), then ``$ML_DASH_CONFIG_DIR``
    (default ``~/.dash``) ``tokens.encrypted`` with ``encryption.key`` (needs ``cryptography``),
    then ``tokens.json``; key ``ml-dash-token``. A store that cannot be read is skipped with a
    warning (never its content): the run still logs, and the agent reports the refused token.
    """
    token = environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    import importlib
    import importlib.util

    if importlib.util.find_spec("keyring") is not None:
        try:
            keyring: Any = importlib.import_module("keyring")
            stored = keyring.get_password("ml-dash", TOKEN_KEY)
        except Exception as exc:
            log.debug("dashcar: no ML-Dash token from the keyring (%s)", type(exc).__name__)
            stored = None
        if isinstance(stored, str) and stored:
            return stored
    config = Path(environ.get("ML_DASH_CONFIG_DIR") or Path(environ.get("HOME") or Path.home()) / ".dash")
    encrypted = config / "tokens.encrypted"
    if encrypted.exists():
        try:
            fernet: Any = importlib.import_module("cryptography.fernet")
            key = (config / "encryption.key").read_bytes().strip()
            value = _read_tokens(encrypted, bytes(fernet.Fernet(key).decrypt(encrypted.read_bytes())))
        except ImportError:
            log.warning("dashcar: %s needs the cryptography package to be read", encrypted)
            value = None
        except Exception as exc:
            log.warning("dashcar: cannot read %s (%s)", encrypted, type(exc).__name__)
            value = None
        if value:
            return value
    plain = config / "tokens.json"
    try:
        data = plain.read_bytes()
    except OSError:
        return None
    return _read_tokens(plain, data)


def _loopback(url: str) -> bool:
    from urllib.parse import urlsplit

    return (urlsplit(url).hostname or "") in ("localhost", "127.0.0.1", "::1")


def remote_info(url: str, local: bool, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """What a run's ``RUN_OPEN`` tells the agent about where it ships (the agent keeps it out of the run's files)."""
    token = find_token(environ)
    if token is None and not _loopback(url):
        log.warning("dashcar: no ML-Dash token found (set %s or log in with the ml-dash CLI); "
                    "the agent keeps the run until a token is accepted", TOKEN_ENV)
    info: dict[str, Any] = {"dash_url": url, "local": local}
    if token:
        info["dash_token"] = token
    return info
