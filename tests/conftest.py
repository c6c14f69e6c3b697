"""Shared fixtures: a tiny model saved in diffusers format, one Prefect API for the session, table helpers."""

from __future__ import annotations

import os

# Before Prefect or Hugging Face libraries are imported: nothing may reach the network, and Prefect's
# state stays inside the test session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

# diffusers and transformers give their loggers a stderr handler on first use, bound to whatever sys.stderr is
# then. Made here, it is the session's; made inside a test that captures stderr (capsys), it would be that
# test's buffer, closed afterwards, and every later test's log record from them would print a "Logging error"
# traceback into its own captured stderr.
diffusers_logging.get_logger("diffusers")
transformers_logging.get_logger("transformers")

from nodes.toymodel import ToyModelConfig, save_toy_model

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


def write_table(path, rows: list[dict], schema: pa.Schema | None = None, row_group_size: int | None = None) -> str:
    """Write rows to a Parquet prompt table; returns its path as a string."""
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)
