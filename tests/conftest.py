"""Shared fixtures: a tiny model saved in diffusers format, one Prefect API for the session, an uninterrupted reference run."""

from __future__ import annotations

import os

# Before Prefect or Hugging Face libraries are imported: nothing may reach the network, and Prefect's
# state stays inside the test session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# A server per CLI run, stopped with it, unless a test asks for a kept one (tests/test_kept_server.py): nothing of
# the suite outlives it.
os.environ.setdefault("SDFLOW_SERVER_IDLE_SECONDS", "0")

import pytest
import s3fs
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

# diffusers and transformers give their loggers a stderr handler on first use, bound to whatever sys.stderr is
# then. Made here, it is the session's; made inside a test that captures stderr (capsys), it would be that
# test's buffer, closed afterwards, and every later test's log record from them would print a "Logging error"
# traceback into its own captured stderr.
diffusers_logging.get_logger("diffusers")
transformers_logging.get_logger("transformers")

from nodes.shapes.builders import ToyModelConfig, save_toy_model
from tests.support.models import save_tiny_sdxl
from tests.support.runs import RESUME_ROWS, RESUME_RUN, uninterrupted_run
from tests.support.s3_server import BUCKET, FAKE_AWS_ENV, UNSET_AWS_ENV, MotoS3Server
from tests.support.tables import TEST_STEPS




@pytest.fixture(scope="session", autouse=True)
def prefect_home(tmp_path_factory):
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ["SDFLOW_CACHE"] = str(tmp_path_factory.mktemp("sdflow-cache"))  # model copies, file hashes: not ~/.cache
    yield


@pytest.fixture(scope="session")
def prefect_api(prefect_home):
    """A real Prefect API server (SQLite) for the whole session; yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random tiny Stable Diffusion (64x64 images) saved in diffusers format, with sdflow defaults."""
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_toy_model(path, ToyModelConfig(seed=1), defaults={"steps": TEST_STEPS, "guidance_scale": 7.5})
    return str(path)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    """A random tiny Stable Diffusion XL (64x64 images) saved in diffusers format."""
    return str(save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=3))


@pytest.fixture(scope="module")
def resume_reference(prefect_api, tiny_model, tmp_path_factory):
    """An uninterrupted run: the images every interrupted-then-resumed run must reproduce."""
    return uninterrupted_run(tmp_path_factory.mktemp("reference"), RESUME_ROWS, tiny_model, RESUME_RUN)


# S3 on loopback (moto's server mode): a server per test module, a clean bucket per test.


@pytest.fixture(scope="module")
def s3_server():
    with MotoS3Server() as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Fake credentials and AWS_ENDPOINT_URL pointing at the loopback server; restored after the test."""
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    for name in UNSET_AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("SDFLOW_STORAGE_OPTIONS", "")  # recorded, so that a CLI run's setting is undone too
    return s3_server.endpoint_url


@pytest.fixture
def s3(s3_server, s3_env):
    """A clean server with one empty bucket, and an s3fs client of the test's own to set up and check."""
    s3fs.S3FileSystem.clear_instance_cache()
    s3_server.reset()
    fs = s3fs.S3FileSystem(endpoint_url=s3_server.endpoint_url, skip_instance_cache=True)
    fs.mkdir(BUCKET)
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
