"""Fixtures for the unit tests of the API source (test_kube_source.py,
test_kube_reflector.py): the in-process API stand-in, and agents started on it
(tests/unit/kubelab.py), stopped after each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.apiserver import FakeApiServer
from tests.unit.kubelab import Live


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.1, timeout_scale=0.02) as server:
        yield server


@pytest.fixture
def live(api: FakeApiServer, tmp_path: Path) -> Iterator[Callable[..., Live]]:
    """live(start=True, timing=kubelab.FAST, **AgentConfig fields) -> a Live agent, stopped
    after the test (and checked to stop promptly)."""
    made: list[Live] = []

    def make(start: bool = True, **cfg: Any) -> Live:
        lv = Live(api, tmp_path, **cfg)
        made.append(lv)
        return lv.start() if start else lv

    yield make
    for lv in made:
        if lv.thread.is_alive():
            lv.stop()  # within 4 s, every watch thread gone
