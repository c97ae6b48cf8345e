"""The agent in this process, following an API server, on a recording in-memory dataplane;
and a child process with its output in a log file, for tests that run the agent (or
kube-proxy) as the real program.

`Live` is shared by the tests against the in-repository API stand-in
(tests/unit/test_kube_source.py, test_kube_reflector.py) and against the real
kube-apiserver (tests/realapi/): the same Agent and KubeSource the daemon runs, only the
kubeconfig differs. `ChildProcess` serves the kernel tests that start, signal and kill
processes (tests/kernel/test_safety.py, test_migrate.py).
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipvsproxy.agent import Agent
from ipvsproxy.config import AgentConfig
from ipvsproxy.dataplane.memory import MemoryDataplane
from ipvsproxy.model import AF_INET, VSKey
from ipvsproxy.plan import Op

if TYPE_CHECKING:  # the kubernetes client is a heavy import; the kernel tests need only ChildProcess
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
        from ipvsproxy.sources.kube import KubeSource

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


class ChildProcess:
    """A program run as a child in its own session (a signal to the test's process group does
    not reach it), its output appended to a log file (never the VM's stdout): started,
    signalled, stopped with SIGTERM as the kubelet does, its log's tail and problems."""

    def __init__(self, name: str, log: Path) -> None:
        self.name, self.log = name, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0  # time.time() at the last start
        self.killed = False  # the last term() had to SIGKILL it

    def start(self, cmd: Sequence[str], note: str = "", *, env: Mapping[str, str] | None = None,
              cwd: str | Path | None = None) -> None:
        """Start `cmd`; a line in the log says what was started (`note` first)."""
        with open(self.log, "ab") as log:
            log.write(f"==== {note}{' '.join(cmd)}\n".encode())
            log.flush()
            self.started = time.time()
            self.proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env, cwd=cwd)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def term(self, timeout: float = 60.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited after `timeout` s (`killed` says so); the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.killed = False
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.killed = True
            self.proc.kill()
            return self.proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])

    def problems(self) -> list[str]:
        """The log's WARNING and ERROR lines and tracebacks."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [ln for ln in text.splitlines() if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]
