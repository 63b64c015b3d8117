"""The whole topology as local processes (verifier TP=N, draft, gateway): `specd up-local` and the e2e tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.rpc.health_check import check


class LocalTopology:
    def __init__(self, target: str, draft: str | None, tp: int = 2, dtype: str = "bfloat16",
                 ports=(50051, 50052, 50053), k: str = "auto", log_dir: Path | None = None, extra_env=None):
        self.target, self.draft, self.tp, self.dtype, self.k = target, draft, tp, dtype, k
        self.gateway_port, self.draft_port, self.verifier_port = ports
        self.log_dir = log_dir
        self.env = {**os.environ, **(extra_env or {})}
        self.procs: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, args: list[str]) -> None:
        out = open(self.log_dir / f"{name}.log", "w") if self.log_dir else None
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "common.cli", *args], env=self.env,
                                            stdout=out or None, stderr=subprocess.STDOUT if out else None,
                                            start_new_session=True)

    def start(self, timeout_s: float = 600.0) -> None:
        self._spawn("verifier", ["verifier", "--model", self.target, "--tp", str(self.tp), "--dtype", self.dtype,
                                 "--port", str(self.verifier_port)])
        if self.draft:
            self._spawn("draft", ["draft", "--model", self.draft, "--dtype", self.dtype,
                                  "--port", str(self.draft_port)])
        self.wait_serving(f"127.0.0.1:{self.verifier_port}", "verifier", timeout_s)
        if self.draft:
            self.wait_serving(f"127.0.0.1:{self.draft_port}", "draft", timeout_s)
        self.start_gateway()
        self.wait_serving(f"127.0.0.1:{self.gateway_port}", "gateway", timeout_s)

    def start_gateway(self) -> None:
        self._spawn("gateway", ["gateway", "--tokenizer", self.target, "--k", self.k,
                                "--port", str(self.gateway_port), "--verifier", f"127.0.0.1:{self.verifier_port}",
                                "--draft", f"127.0.0.1:{self.draft_port}" if self.draft else ""])

    def start_draft(self) -> None:
        self._spawn("draft", ["draft", "--model", self.draft, "--dtype", self.dtype, "--port", str(self.draft_port)])

    def wait_serving(self, target: str, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} before serving")
            ok, _ = check(target, timeout_s=1.0)
            if ok:
                return
            time.sleep(0.3)
        raise TimeoutError(f"{name} not SERVING on {target} after {timeout_s:.0f}s")

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        proc = self.procs.get(name)
        if proc and proc.poll() is None:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=60)

    def stop(self) -> None:
        for name in ("gateway", "draft", "verifier"):
            proc = self.procs.get(name)
            if proc and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
