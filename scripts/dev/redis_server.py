"""A local `redis-server` process on loopback: `specd up-local`, the tests and the benchmarks start it this way.

Optionally with AUTH (`password`, handed to redis-server on stdin, never on its command line) and TLS only
(`tls=(cert, key, ca)`: the plaintext port is closed, clients need not present certificates)."""
from __future__ import annotations

import secrets
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from common.distributed import free_port

HMAC_KEY_FILE = "prefix-cache-hmac.key"


def redis_server_argv(port: int, maxmemory: str = "256mb", policy: str = "allkeys-lru",
                      tls: tuple[str, str, str] | None = None) -> list[str] | None:
    """The command line of a throwaway cache server (no persistence), or None when redis-server is missing."""
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    ports = ["--port", str(port)] if tls is None else [
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", tls[0], "--tls-key-file", tls[1],
        "--tls-ca-cert-file", tls[2], "--tls-auth-clients", "no"]
    return [exe, *ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--maxmemory", maxmemory, "--maxmemory-policy", policy, "--loglevel", "warning"]


def write_hmac_key_file(folder: Path) -> Path:
    """A fresh random prefix-cache HMAC key in `folder` (mode 0600), for services sharing a Redis started here."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / HMAC_KEY_FILE
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(secrets.token_hex(32) + "\n")
    return path


def redis_answers(port: int, tls: bool = False) -> bool:
    """True when something on 127.0.0.1:`port` answers PING like Redis (a server with AUTH answers NOAUTH)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw:
            s = raw
            if tls:                                # only "is it up": the certificate is checked by real clients
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                s = ctx.wrap_socket(raw)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """A redis-server of its own, for a test or a benchmark; `stop()` (or `kill()`) ends it."""

    def __init__(self, maxmemory: str = "64mb", policy: str = "allkeys-lru", timeout_s: float = 10.0,
                 password: str | None = None, tls: tuple[str, str, str] | None = None):
        """`tls`: (certificate, key, CA) files; the URL then is rediss://...?ssl_ca_certs=<CA>."""
        if password is not None and not password.isprintable() or '"' in (password or ""):
            raise ValueError("RedisServer(password=...): printable, without double quotes")
        self.port = free_port()
        self.password, self.tls = password, tls
        argv = redis_server_argv(self.port, maxmemory, policy, tls)
        if argv is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; `make test` does it)")
        if password is not None:
            argv.insert(1, "-")                    # the config on stdin: the password stays off `ps`
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE if password is not None else subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if password is not None:
            self.proc.stdin.write(f'requirepass "{password}"\n'.encode())
            self.proc.stdin.close()
        scheme, query = ("redis", "") if tls is None else ("rediss", f"?ssl_ca_certs={quote(tls[2])}")
        self.url = f"{scheme}://127.0.0.1:{self.port}/0{query}"
        deadline = time.monotonic() + timeout_s
        while not redis_answers(self.port, tls=tls is not None):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING on 127.0.0.1:{self.port}")
            time.sleep(0.05)

    def client(self):
        import redis
        extra = {} if self.tls is None else {"ssl": True, "ssl_ca_certs": self.tls[2]}
        return redis.Redis(port=self.port, socket_timeout=2, password=self.password, **extra)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    kill = stop
