"""The `specd` command line on tiny models: generate --json, clear errors, health, `python -m scripts.cli`."""
import json
import subprocess
import sys

import pytest

from scripts.cli import main
from tests.checkpoints import build_model_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return str(build_model_folder(root / "t", seed=1)), str(build_model_folder(root / "d", seed=2))


def test_generate_json_prints_one_object_per_prompt(folders, capsys):
    target, draft = folders
    rc = main(["generate", "--target", target, "--draft", draft, "--k", "auto", "--dtype", "float32",
               "--max-tokens", "6", "--temperature", "0.7", "--seed", "3", "--json", "<w5><w9>", "<w1>"])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["prompt"] for o in lines] == ["<w5><w9>", "<w1>"]
    for o in lines:
        assert len(o["token_ids"]) <= 6 and isinstance(o["text"], str)
        assert {"drafted", "accepted", "acceptance_rate", "mean_acceptance_length", "accepted_per_position",
                "draft_time_s", "verify_time_s"} <= o["stats"].keys()


@pytest.mark.parametrize("argv,message", [
    (["--k", "99"], "num_speculative_tokens=99"),
    (["--temperature", "-1"], "temperature=-1.0"),
    (["--top-p", "0"], "top_p=0.0"),
    (["--max-tokens", "0"], "max_tokens=0"),
])
def test_generate_bad_flags_exit_2_with_the_field_named(folders, capsys, argv, message):
    target, _ = folders
    assert main(["generate", "--target", target, "--draft", "ngram", *argv, "<w1>"]) == 2
    assert message in capsys.readouterr().err


def test_health_of_nothing_listening_exits_1(capsys):
    from common.distributed import free_port
    assert main(["health", f"127.0.0.1:{free_port()}", "--timeout", "0.5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().out


def test_python_dash_m_scripts_cli_lists_every_command():
    # How LocalTopology and the e2e tests spawn the services: the package's __main__ must run main().
    out = subprocess.run([sys.executable, "-m", "scripts.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("models", "demo", "generate", "draft", "verifier", "gateway", "up-local", "down-local", "health"):
        assert f"    {command} " in out, f"{command} missing from `specd --help`"
