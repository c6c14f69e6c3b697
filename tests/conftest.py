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

import pytest
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

# diffusers and transformers give their loggers a stderr handler on first use, bound to whatever sys.stderr is
# then. Made here, it is the session's; made inside a test that captures stderr (capsys), it would be that
# test's buffer, closed afterwards, and every later test's log record from them would print a "Logging error"
# traceback into its own captured stderr.
diffusers_logging.get_logger("diffusers")
transformers_logging.get_logger("transformers")

from nodes.shapes.builders import ToyModelConfig, save_toy_model
from tests.support.runs import RESUME_ROWS, RESUME_RUN, images_by_id
from tests.support.tables import write_table

TEST_STEPS = 4  # the tiny model's default steps in tests: enough for every scheduler's multistep logic


@pytest.fixture(scope="session", autouse=True)
def prefect_home(tmp_path_factory):
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
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


@pytest.fixture(scope="module")
def resume_reference(prefect_api, tiny_model, tmp_path_factory):
    """An uninterrupted run: the images every interrupted-then-resumed run must reproduce."""
    from flows.generate import generate_dataset

    root = tmp_path_factory.mktemp("reference")
    prompts = write_table(root / "prompts.parquet", RESUME_ROWS)
    generate_dataset(prompts=prompts, out=str(root / "out"), model=tiny_model, **RESUME_RUN)
    return prompts, images_by_id(root / "out")
