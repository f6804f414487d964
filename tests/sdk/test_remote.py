"""Where a run ships: the server URL and the token, found where ``ml_dash`` 0.11 finds them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from dashcar import _remote


@pytest.fixture(autouse=True)
def no_keyring() -> Iterator[None]:
    """This process asks keyring's own "no keyring" backend, whatever the user running the tests has."""
    import keyring
    from keyring.backends import fail

    before = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())  # type: ignore[no-untyped-call]
    yield
    keyring.set_keyring(before)


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(tmp_path / "home"), "ML_DASH_CONFIG_DIR": str(tmp_path / "dash"), **extra}


def test_the_producers_variable_wins_then_ml_dashs_files_in_its_order(tmp_path: Path) -> None:
    config = tmp_path / "dash"
    config.mkdir()
    env = env_for(tmp_path)
    assert _remote.find_token(env) is None, "no token anywhere"
    (config / "tokens.json").write_text(json.dumps({"ml-dash-token": "plain"}))
    assert _remote.find_token(env) == "plain"
    key = Fernet.generate_key()
    (config / "encryption.key").write_bytes(key)
    (config / "tokens.encrypted").write_bytes(Fernet(key).encrypt(json.dumps({"ml-dash-token": "sealed"}).encode()))
    assert _remote.find_token(env) == "sealed", "the encrypted store comes before tokens.json"
    assert _remote.find_token({**env, "DASHCAR_DASH_TOKEN": " mine \n"}) == "mine"
    (config / "encryption.key").write_bytes(Fernet.generate_key())
    assert _remote.find_token(env) == "plain", "an unreadable store is skipped"


def test_the_default_config_dir_is_home_dash(tmp_path: Path) -> None:
    (tmp_path / "home" / ".dash").mkdir(parents=True)
    (tmp_path / "home" / ".dash" / "tokens.json").write_text('{"ml-dash-token": "from-home"}')
    env = {"HOME": str(tmp_path / "home")}
    assert _remote.find_token(env) == "from-home"
    (tmp_path / "home" / ".dash" / "tokens.json").write_text("{not json")
    assert _remote.find_token(env) is None


def test_the_keyring_comes_first_when_installed(tmp_path: Path) -> None:
    """A real keyring backend (a file, from keyrings.alt) in a fresh process, as a user's would be."""
    (tmp_path / "dash").mkdir()
    (tmp_path / "dash" / "tokens.json").write_text('{"ml-dash-token": "plain"}')
    code = textwrap.dedent("""
        import os, keyring
        from dashcar import _remote
        keyring.set_password("ml-dash", "ml-dash-token", "from-keyring")
        print(_remote.find_token(os.environ))
    """)
    env = {**os.environ, **env_for(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data"),
           "PYTHON_KEYRING_BACKEND": "keyrings.alt.file.PlaintextKeyring"}
    env.pop("DASHCAR_DASH_TOKEN", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "from-keyring"


def test_urls_as_ml_dash_takes_them() -> None:
    assert _remote.api_url(True, {}) == "https://api.dash.ml"
    assert _remote.api_url(True, {"ML_DASH_API_URL": "http://dash.lab:3000/sub/"}) == "http://dash.lab:3000/sub"
    assert _remote.api_url("https://x.example/", {}) == "https://x.example"
    for bad in ("x.example", "ftp://x", "https://"):
        with pytest.raises(ValueError, match="not an http"):
            _remote.api_url(bad, {})
    assert _remote.remote_root("https://x.example") == "/.dashcar-remote/https%3A%2F%2Fx.example"


def test_a_missing_token_is_reported_once_at_start_and_never_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = env_for(tmp_path)
    info = _remote.remote_info("https://dash.example", False, env)
    assert info == {"dash_url": "https://dash.example", "local": False}
    assert "no ML-Dash token found" in caplog.text
    assert _remote.remote_info("http://127.0.0.1:1", True, {**env, "DASHCAR_DASH_TOKEN": "t"})["dash_token"] == "t"
