"""Hub ids: one in the local Hugging Face cache loads offline; one that is not says so within seconds, whatever the network."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np

from tests.support.runs import images_by_id
from tests.support.tables import write_table

ROWS = [{"id": i, "prompt": f"a red circle {i}", "seed": i} for i in range(2)]


def cli(args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "generate", *map(str, args)],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )
    return done, time.monotonic() - started


def assert_unavailable_offline(done: subprocess.CompletedProcess, *phrases: str) -> None:
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("sdflow: error: ") and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("sdflow: error:") == 1 and done.stderr.strip().count("\n\n") == 0, done.stderr
    text = " ".join(done.stderr.split())
    for phrase in ("sdflow-test/not-cached", "not in the local cache", "--model", *phrases):
        assert phrase in text, done.stderr


def test_a_hub_id_not_cached_with_the_hub_offline_is_refused_at_once(tmp_path):
    table = write_table(tmp_path / "t.parquet", ROWS)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "PREFECT_HOME": str(tmp_path / "ph")}
    done, seconds = cli([table, tmp_path / "out", "--model", "sdflow-test/not-cached"], env)
    assert_unavailable_offline(done, "HF_HUB_OFFLINE")
    assert not (tmp_path / "out").exists()


def test_the_offline_verdict_itself_takes_no_retries(monkeypatch, tmp_path):
    """In-process, without the command's start-up: a bound that separates no retries from huggingface_hub's (25 s+)."""
    import huggingface_hub.constants
    import pytest

    from nodes.errors import ModelError
    from nodes.pipeline.components import inspect_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(ModelError, match="not in the local cache"):
        inspect_model("sdflow-test/not-cached")
    assert time.monotonic() - started < 5


def test_a_hub_id_behind_a_network_that_never_answers_is_refused_within_seconds(tmp_path):
    """A proxy that accepts connections and never answers: what a firewalled cluster often does."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held = []
    stop = threading.Event()

    def accept_and_hold():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept_and_hold, daemon=True).start()
    proxy = f"http://127.0.0.1:{listener.getsockname()[1]}"
    table = write_table(tmp_path / "t.parquet", ROWS)
    env = {
        "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "PREFECT_HOME": str(tmp_path / "ph"),
        "HTTPS_PROXY": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy, "http_proxy": proxy,
    }
    try:
        done, seconds = cli([table, tmp_path / "out", "--model", "sdflow-test/not-cached"], env)
    finally:
        stop.set()
        for connection in held:
            connection.close()
        listener.close()
    assert held, "the proxy was never asked: the test would prove nothing"
    assert_unavailable_offline(done, "did not answer")
    assert seconds < 60, seconds  # the probe's 5 s and the start-up, not huggingface_hub's minutes behind such a proxy
    assert not (tmp_path / "out").exists()


def test_a_hub_id_in_the_local_cache_loads_offline(prefect_api, tiny_model, tmp_path, monkeypatch):
    """The cache as huggingface_hub lays it out: models--ORG--NAME/refs/main naming a snapshot folder."""
    import huggingface_hub.constants

    from flows.generate import generate_dataset

    cache = tmp_path / "hf-cache"
    repo = cache / "models--sdflow-test--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    table = write_table(tmp_path / "t.parquet", ROWS)
    by_id = generate_dataset(prompts=table, out=str(tmp_path / "hub"), model="sdflow-test/tiny", steps=2)
    by_folder = generate_dataset(prompts=table, out=str(tmp_path / "folder"), model=tiny_model, steps=2)
    assert by_id["rows"]["generated"] == by_folder["rows"]["generated"] == 2
    # A hub model is named by its commit and configs (see the next test), a folder by its files' content.
    assert by_id["resolved"]["model_fingerprint"] != by_folder["resolved"]["model_fingerprint"]
    got, want = images_by_id(tmp_path / "hub"), images_by_id(tmp_path / "folder")
    assert all(np.array_equal(got[i], want[i]) for i in want)


def test_a_hub_model_has_one_identity_however_much_of_it_is_cached(tiny_model, tmp_path, monkeypatch):
    """Configs only (what inspecting an uncached id leaves), then complete: the first is not a usable local copy,
    and the fingerprint of the complete one equals the one the hub path computes (commit and configs)."""
    import json

    import huggingface_hub
    import huggingface_hub.constants
    import pytest

    from nodes.errors import ModelError
    from nodes.pipeline import components

    cache = tmp_path / "hf-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--sdflow-test--tiny" / "snapshots" / commit
    for name in components.COMPONENT_FILES:
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f"{tiny_model}/{name}", snapshot / name)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="not in the local cache"):
        components.inspect_model("sdflow-test/tiny")

    configs = {name: json.loads((snapshot / name).read_text()) for name in components.COMPONENT_FILES}
    family = components.family_of(configs["model_index.json"], "sdflow-test/tiny")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **kw: str(snapshot / name))
    from_hub = components.model_fingerprint(None, family, "sdflow-test/tiny", configs)
    shutil.rmtree(snapshot)
    shutil.copytree(tiny_model, snapshot)
    assert components.inspect_model("sdflow-test/tiny").fingerprint == from_hub
