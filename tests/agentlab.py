"""The agent in this process, following an API server, on a recording in-memory dataplane.

Shared by the tests against the in-repository API stand-in (tests/unit/test_kube_source.py,
test_kube_reflector.py) and against the real kube-apiserver (tests/realapi/): the same
Agent and KubeSource the daemon runs, only the kubeconfig differs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ipvsproxy.agent import Agent
from ipvsproxy.config import AgentConfig
from ipvsproxy.dataplane.memory import MemoryDataplane
from ipvsproxy.model import AF_INET, VSKey
from ipvsproxy.plan import Op
from ipvsproxy.sources.kube import KubeSource, Timing

NODE = "n1"


def wait_until(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition",
               interval: float = 0.02) -> Any:
    """Poll cond until it is truthy (returning its value) or fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except RuntimeError:  # a dict changed size while the runner thread wrote it: look again
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def key(address: str, port_: int = 80, proto: int = 6) -> VSKey:
    return VSKey(AF_INET, proto, address, port_)


def rs(*ips: str, port_: int = 8080) -> set[tuple[str, int]]:
    return {(ip, port_) for ip in ips}


class RecordingDataplane(MemoryDataplane):
    """The memory dataplane, remembering every batch of operations applied."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[Op]] = []
        self.lock = threading.Lock()

    def apply(self, ops: Sequence[Op]) -> list[Any]:
        with self.lock:
            failures = super().apply(ops)
            if ops:
                self.batches.append(list(ops))
            return failures

    def ops(self, since: int = 0, prefix: str = "") -> list[Op]:
        """Operations of the batches from `since` on (on addresses starting with `prefix`)."""
        with self.lock:
            return [op for batch in self.batches[since:] for op in batch
                    if (op.key.address if op.key is not None else op.address or "").startswith(prefix)]

    def table(self, prefix: str = "") -> dict[VSKey, set[tuple[str, int]]]:
        with self.lock:
            return {k: set(vs.reals) for k, vs in self.state.services.items() if k.address.startswith(prefix)}

    def reals(self, k: VSKey) -> set[tuple[str, int]] | None:
        return self.table().get(k)


class Live:
    """ipvsproxy's Agent with the real KubeSource, in this process, on a RecordingDataplane."""

    def __init__(self, kubeconfig_path: str, tmp_path: Path, *, timing: Timing | None = None,
                 **cfg: Any) -> None:
        """`cfg` overrides any AgentConfig field (kubeconfig=None: in-cluster credentials);
        `timing` is the API source's (its backoff and pauses; None: the real ones)."""
        settings: dict[str, Any] = dict(
            node_name=NODE, kubeconfig=kubeconfig_path, min_sync_period=0.05, sync_period=30,
            healthz_bind_address="", metrics_bind_address="", state_dir=str(tmp_path / "state"))
        settings.update(cfg)
        self.dp = RecordingDataplane()
        self.agent = Agent(AgentConfig(**settings), self.dp, source_timing=timing)
        self.thread = threading.Thread(target=self.agent.run, kwargs={"install_signals": False}, daemon=True)

    def start(self) -> Live:
        self.thread.start()
        wait_until(lambda: self.agent.source is not None, what="the kube source")
        return self

    @property
    def source(self) -> KubeSource:
        src = self.agent.source
        assert isinstance(src, KubeSource)
        return src

    @property
    def syncs(self) -> int:
        return self.agent.reconciler.syncs

    def stop(self, within: float = 10.0) -> None:
        self.agent.stop()
        self.thread.join(within)
        assert not self.thread.is_alive(), "agent did not stop"
