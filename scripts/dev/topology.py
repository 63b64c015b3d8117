"""The whole topology as local processes (redis, verifier TP=N, draft, gateway): `specd up-local` (foreground, or
detached with a state file that `specd down-local` reads) and the e2e tests.

Plaintext (`--insecure`, said explicitly on every command line) unless `tls=` is given: then every service serves
TLS with that certificate, the draft and verifier require client certificates from the same CA (mTLS), and the
gateway presents the same certificate to them (it must allow both server and client authentication)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common.rpc.health_check import check
from common.rpc.tls import PLAINTEXT, TLSConfig

STATE_FILE = "state.json"
# Stop order: the gateway drains its in-flight requests first (they still need the model services), Redis last.
STOP_ORDER = ("gateway", "draft", "verifier", "redis")
STOP_PHASES = (("gateway",), ("draft", "verifier"), ("redis",))
# Settings the topology passes as flags: inherited values would contradict them (e.g. SPECD_TLS_CERT with --insecure).
_OWNED_ENV = ("SPECD_INSECURE", "SPECD_TLS_CERT", "SPECD_TLS_KEY", "SPECD_TLS_CA", "SPECD_UPSTREAM_INSECURE",
              "SPECD_UPSTREAM_TLS_CA", "SPECD_UPSTREAM_TLS_CERT", "SPECD_UPSTREAM_TLS_KEY",
              "SPECD_UPSTREAM_TLS_SERVER_NAME")


class LocalTopology:
    def __init__(self, target: str, draft: str | None, tp: int = 2, dtype: str = "bfloat16",
                 ports=(50051, 50052, 50053), k: str = "auto", log_dir: Path | None = None, extra_env=None,
                 tls: TLSConfig | None = None, api_keys: list[str] | None = None, log_level: str | None = None,
                 http_port: int = 0, nnodes: int = 1):
        """`tls`: cert/key served by all three (SAN 127.0.0.1) and presented by the gateway upstream, `ca` that
        signed it; None = plaintext. `api_keys`: required by the gateway (passed in its environment, never on a
        command line). `http_port`: the gateway's OpenAI-compatible HTTP API (0 = off). `nnodes` > 1: the
        verifier's `tp` ranks as that many "nodes" on loopback, one `specd verifier` process (group) each,
        meeting at a c10d store on a free port (node i is the process named `verifier-node{i}`)."""
        self.http_port = http_port
        self.nnodes = nnodes
        self.rdzv_endpoint: str | None = None               # node 0's c10d store, once a multi-node verifier ran
        self.target, self.draft, self.tp, self.dtype, self.k = target, draft, tp, dtype, k
        self.gateway_port, self.draft_port, self.verifier_port = ports
        self.log_dir = log_dir
        if tls is not None and (tls.insecure or not (tls.cert and tls.ca)):
            raise ValueError("LocalTopology(tls=...): needs cert, key and ca (or tls=None for plaintext)")
        self.tls = tls
        self.log_level = log_level                          # the services' --log-level (default: WARNING)
        self.env = {k: v for k, v in {**os.environ, **(extra_env or {})}.items() if k not in _OWNED_ENV}
        if api_keys:
            self.env["SPECD_API_KEYS"] = ",".join(api_keys)
        self.procs: dict[str, subprocess.Popen] = {}
        self.service_env: dict[str, dict[str, str]] = {}   # per process, on top of self.env
        self.redis_port: int | None = None
        self.on_spawn = None                                # called after each process starts (the state file)

    def _spawn(self, name: str, args: list[str]) -> None:
        level = ["--log-level", self.log_level] if self.log_level else []
        self._spawn_argv(name, [sys.executable, "-m", "scripts.cli", *level, *args])

    def _spawn_argv(self, name: str, argv: list[str]) -> None:
        old = self.procs.get(name)
        if old is not None:
            try:
                old.wait(timeout=5)                         # a process just killed may not be reaped yet
            except subprocess.TimeoutExpired:
                # Replacing it would orphan a live process (and gRPC's SO_REUSEPORT would let both serve).
                raise RuntimeError(f"{name} is already running (pid {old.pid}): stop it first, or start the "
                                   "new one under another name") from None
        # Each process leads its own process group (the verifier's TP ranks join it), so stopping a service is one
        # killpg, and a detached topology outlives the command that started it.
        out = open(self.log_dir / f"{name}.log", "w") if self.log_dir else None
        try:
            self.procs[name] = subprocess.Popen(argv, env={**self.env, **self.service_env.get(name, {})},
                                                stdin=subprocess.DEVNULL, stdout=out or None,
                                                stderr=subprocess.STDOUT if out else None, start_new_session=True)
        finally:
            if out:
                out.close()
        if self.on_spawn:
            self.on_spawn(self)

    def start_redis(self, port: int = 0, maxmemory: str = "256mb", timeout_s: float = 10.0) -> bool:
        """Start `redis-server` (if installed) on `port` (0: a free one) and point the services at it with REDIS_URL
        and a fresh HMAC key file (SPECD_PREFIX_CACHE_HMAC_KEY_FILE, in the log folder or a private temporary one).
        Returns False, changing nothing, when redis-server is not on PATH."""
        import tempfile
        from common.distributed import free_port
        from scripts.dev.redis_server import redis_answers, redis_server_argv, write_hmac_key_file
        port = port or free_port()
        argv = redis_server_argv(port, maxmemory)
        if argv is None:
            return False
        self.redis_port = port
        self._spawn_argv("redis", argv)
        deadline = time.monotonic() + timeout_s
        while not redis_answers(self.redis_port):
            if self.procs["redis"].poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING on 127.0.0.1:{self.redis_port}")
            time.sleep(0.05)
        key_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="specd-redis-"))
        self.env["SPECD_PREFIX_CACHE_HMAC_KEY_FILE"] = str(write_hmac_key_file(key_dir))
        self.env.pop("SPECD_REDIS_PASSWORD_FILE", None)      # this server has no AUTH
        self.env["REDIS_URL"] = f"redis://127.0.0.1:{self.redis_port}/0"
        return True

    @property
    def client_tls(self) -> TLSConfig:
        """How to reach any of the three services (probes, tests): the topology's CA and certificate."""
        return self.tls or PLAINTEXT

    def _tls_flags(self, mutual: bool) -> list[str]:
        """Server flags: --insecure said explicitly, or the certificate (and the CA whose clients it accepts)."""
        if self.tls is None:
            return ["--insecure"]
        return ["--tls-cert", self.tls.cert, "--tls-key", self.tls.key, *(["--tls-ca", self.tls.ca] if mutual else [])]

    def _upstream_flags(self) -> list[str]:
        if self.tls is None:
            return []                                       # --insecure covers both hops
        return ["--upstream-tls-ca", self.tls.ca, "--upstream-tls-cert", self.tls.cert,
                "--upstream-tls-key", self.tls.key]

    def start(self, timeout_s: float = 600.0) -> None:
        self.start_verifier()
        if self.draft:
            self.start_draft()
        self.wait_serving(f"127.0.0.1:{self.verifier_port}", "verifier", timeout_s)
        if self.draft:
            self.wait_serving(f"127.0.0.1:{self.draft_port}", "draft", timeout_s)
        self.start_gateway()
        self.wait_serving(f"127.0.0.1:{self.gateway_port}", "gateway", timeout_s)

    def start_gateway(self, name: str = "gateway", port: int | None = None, http_port: int | None = None,
                      extra_args: tuple[str, ...] = (), upstream: tuple[str, str] | None = None) -> None:
        """The gateway; under another `name` (with its own ports, `service_env` and `extra_args`) a second one in
        front of the same draft and verifier. `upstream`: the (verifier, draft) addresses it dials instead of the
        topology's own (e.g. a delay proxy in front of them)."""
        port = self.gateway_port if port is None else port
        verifier, draft = upstream or (f"127.0.0.1:{self.verifier_port}",
                                       f"127.0.0.1:{self.draft_port}" if self.draft else "")
        http_port = self.http_port if http_port is None else http_port
        # The gateway's clients authenticate with API keys, not certificates: its own port is TLS, not mTLS.
        self._spawn(name, ["gateway", "--tokenizer", self.target, "--k", self.k,
                           "--port", str(port), "--http-port", str(http_port), *extra_args,
                           "--verifier", verifier, "--draft", draft,
                           *self._tls_flags(mutual=False), *self._upstream_flags()])

    def start_verifier(self, name: str = "verifier", nodes=None) -> None:
        """Start a verifier on the verifier port. Under another `name` (with its own `service_env`, e.g. another
        metrics port) it joins the one running there (SO_REUSEPORT): a replacement that takes over when it dies.
        With `nnodes` > 1, `nodes` (default: all, 0 first) says which of its nodes to start, in that order."""
        if self.nnodes == 1:
            self._spawn(name, self._verifier_args(None))
            return
        for node in range(self.nnodes) if nodes is None else nodes:
            self._spawn(name if node == 0 else f"verifier-node{node}", self._verifier_args(node))

    def _verifier_args(self, node: int | None) -> list[str]:
        base = ["verifier", "--model", self.target, "--tp", str(self.tp), "--dtype", self.dtype,
                *self._tls_flags(mutual=True)]
        if node is None:
            return [*base, "--port", str(self.verifier_port)]
        from common.distributed import free_port
        self.rdzv_endpoint = self.rdzv_endpoint or f"127.0.0.1:{free_port()}"
        # worker nodes serve only health, on any free port
        port = self.verifier_port if node == 0 else free_port()
        return [*base, "--nnodes", str(self.nnodes), "--rdzv-endpoint", self.rdzv_endpoint,
                "--node-rank", str(node), "--port", str(port)]

    def start_draft(self) -> None:
        self._spawn("draft", ["draft", "--model", self.draft, "--dtype", self.dtype, "--port", str(self.draft_port),
                              *self._tls_flags(mutual=True)])

    def wait_serving(self, target: str, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} before serving")
            ok, _ = check(target, timeout_s=1.0, tls=self.client_tls)
            if ok:
                return
            time.sleep(0.3)
        raise TimeoutError(f"{name} not SERVING on {target} after {timeout_s:.0f}s")

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        proc = self.procs.get(name)
        if proc and proc.poll() is None:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=60)

    def ports(self) -> dict[str, int]:
        """The TCP ports this topology listens on, by process (metrics ports included when set)."""
        ports = {name: port for name, port in (("gateway", self.gateway_port), ("draft", self.draft_port),
                                               ("verifier", self.verifier_port), ("redis", self.redis_port))
                 if name in self.procs}
        if self.http_port and "gateway" in self.procs:
            ports["gateway-http"] = self.http_port
        for name, env in self.service_env.items():
            if name in self.procs and env.get("SPECD_METRICS_PORT", "0") != "0":
                ports[f"{name}-metrics"] = int(env["SPECD_METRICS_PORT"])
        return ports

    def write_state(self, state_dir: Path, status: str) -> Path:
        """Record what runs (pids = process groups, ports, logs) for `specd down-local`; written atomically."""
        state_dir.mkdir(parents=True, exist_ok=True)
        state = {"status": status, "created_by": os.getpid(), "log_dir": str(self.log_dir or ""),
                 "processes": {name: {"pid": p.pid, "started": _start_time(p.pid)} for name, p in self.procs.items()},
                 "ports": self.ports()}
        path = state_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, path)
        return path

    def stop(self) -> None:
        for name in (*STOP_ORDER, *(n for n in self.procs if n not in STOP_ORDER)):   # replacements too
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


# ---- detached mode: `specd down-local` works from the state file alone ------------------------------------------

def read_state(state_dir: Path) -> dict | None:
    path = Path(state_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def running_processes(state: dict) -> dict[str, list[int]]:
    """Live (non-zombie) pids of each recorded process group. A group is ours while its leader is ours (same
    start time) or gone; Linux never hands out a pid that is still some group's id, so an orphaned group (TP
    ranks whose leader died) is ours too."""
    import psutil
    groups = {}
    for name, rec in state["processes"].items():
        pid = rec["pid"]
        started = _start_time(pid)
        if rec["started"] is None or (started is not None and abs(started - rec["started"]) > 0.05):
            continue                                    # gone before it was recorded, or the pid is a stranger's
        groups[pid] = name
    live: dict[str, list[int]] = {}
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            pgid = os.getpgid(proc.info["pid"])
        except ProcessLookupError:
            continue
        if pgid in groups and proc.info["status"] != psutil.STATUS_ZOMBIE:
            live.setdefault(groups[pgid], []).append(proc.info["pid"])
    return live


def open_ports(state: dict) -> dict[str, int]:
    return {name: port for name, port in state["ports"].items() if _accepts(port)}


def down(state_dir: Path, grace_s: float = 30.0, log=print) -> list[str]:
    """Stop a detached topology: SIGTERM each process group (gateway first), SIGKILL what outlives `grace_s`, then
    check that no process and no port is left. Returns what is left (empty = all gone; the state file is removed)."""
    state = read_state(state_dir)
    if state is None:
        return []
    pgids = {name: rec["pid"] for name, rec in state["processes"].items()}
    others = tuple(name for name in pgids if name not in STOP_ORDER)
    for phase in (*STOP_PHASES, others):
        names = [name for name in phase if name in running_processes(state)]
        for name in names:
            log(f"stopping {name} (process group {pgids[name]})")
            _signal_group(pgids[name], signal.SIGTERM)
        _wait_gone(state, names, grace_s)
    for name, pids in running_processes(state).items():
        log(f"{name} outlived the {grace_s:.0f}s grace: SIGKILL to {pids}")
        _signal_group(pgids[name], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while running_processes(state) and time.monotonic() < deadline:
        time.sleep(0.1)
    deadline = time.monotonic() + 1               # a dead process's listening sockets close with it
    while open_ports(state) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [f"{name}: pids {pids} still running" for name, pids in running_processes(state).items()]
    left += [f"{name}: port {port} still accepts connections" for name, port in open_ports(state).items()]
    if not left:
        (Path(state_dir) / STATE_FILE).unlink(missing_ok=True)
    return left


def _wait_gone(state: dict, names: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while names and set(names) & running_processes(state).keys() and time.monotonic() < deadline:
        time.sleep(0.1)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _start_time(pid: int) -> float | None:
    import psutil
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def _accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False

