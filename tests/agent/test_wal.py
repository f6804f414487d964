"""The WAL's append path against a second writer in another process (a real LMDB, two processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dashcar.agent.errors import WALError
from dashcar.agent.wal import Wal


def test_a_second_appender_is_refused_not_overwritten(tmp_path: Path) -> None:
    """Records another process appended are never replaced; the refused batch is an error the caller
    counts, and the next append continues after the other writer's records."""
    ours = Wal(tmp_path / "wal", 1 << 30, state=False)
    other = (
        "from pathlib import Path; from dashcar.agent.wal import Wal; "
        f"Wal(Path({str(tmp_path / 'wal')!r}), 1 << 30).append([b'theirs'], {{}})"
    )
    subprocess.run([sys.executable, "-c", other], check=True)
    with pytest.raises(WALError, match="another process"):
        ours.append([b"mine"], {})
    assert ours.append([b"next"], {}) == 2
    assert ours.read(0, 10) == [(1, b"theirs"), (2, b"next")]
    ours.close()
