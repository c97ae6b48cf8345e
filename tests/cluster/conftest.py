"""The cluster steps build on each other: a failed step is recorded on its module (``FAILED``) so the
module's fixture can dump the cluster's state (pods, events, component logs) before it stops it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    failed = getattr(getattr(item, "module", None), "FAILED", None)
    if report.failed and isinstance(failed, list):
        failed.append(item.name)
