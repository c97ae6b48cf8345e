"""The cluster steps build on each other: a failed step is recorded on its module (``FAILED``) so the
module's fixture can dump the cluster's state (pods, events, component logs) before it stops it.

The stage runs for about twenty minutes inside an emulated guest that has, rarely, frozen whole
(docs/troubleshooting.md, "The test VM"). So that a frozen guest can be told from a slow step, each
step says when it ends and how long it took, and a heartbeat line comes every HEARTBEAT_S while a
step runs: scripts/vm-run.sh's VM_IDLE_TIMEOUT takes a guest that prints nothing for longer to be
frozen."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

HEARTBEAT_S = 120.0

_step: dict[str, Any] = {"name": "starting", "since": time.monotonic()}


def _heartbeat(stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        print(f"\n[cluster] ... {_step['name']}: {time.monotonic() - _step['since']:.0f} s", flush=True)


@pytest.fixture(scope="session", autouse=True)
def heartbeat() -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=_heartbeat, args=(stop,), name="cluster-heartbeat", daemon=True)
    thread.start()
    yield
    stop.set()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    _step.update(name=item.name, since=time.monotonic())
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    failed = getattr(getattr(item, "module", None), "FAILED", None)
    if report.failed and isinstance(failed, list):
        failed.append(item.name)
    if report.when == "call" or report.failed:
        print(f"\n[cluster] {item.name}: {report.outcome} in {report.duration:.0f} s", flush=True)
        _step.update(name="between steps", since=time.monotonic())
