"""Fixtures shared by the end-to-end tests that talk to a recording ML-Dash server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.mldash_server import FakeMlDash


@pytest.fixture
def fakes() -> Iterator[list[FakeMlDash]]:
    """The recording servers a test started (``dash_common.server``); all stopped at teardown."""
    made: list[FakeMlDash] = []
    yield made
    for f in made:
        f.stop()
