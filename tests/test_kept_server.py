"""The kept Prefect server of CLI runs (flows/server.py): shared by the runs of one PREFECT_HOME, gone when idle.

Real `sdflow generate` processes without PREFECT_API_URL, each PREFECT_HOME a test's own (which marks every
process of it in /proc). The suite's other CLI runs have a server each (conftest: SDFLOW_SERVER_IDLE_SECONDS=0).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.runs import processes_with_env
from tests.support.tables import write_table

ROWS = [{"id": i, "prompt": f"a {colour} circle"} for i, colour in enumerate(["red", "blue", "green"])]


def env_for(home: Path, idle: float, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", SDFLOW_SERVER_IDLE_SECONDS=str(idle))
    return {**env, **extra}


def generate(tiny_model: str, table: str, out: Path, env: dict, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "flows.cli", "generate", table, str(out), "--model", tiny_model, "--steps", "1"]
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finished(process: subprocess.Popen) -> str:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "Traceback" not in err
    return err


def registration(home: Path) -> dict | None:
    path = home / "sdflow-server.json"
    return json.loads(path.read_text()) if path.exists() else None


def servers(home: Path) -> list[int]:
    """The Prefect servers of `home` (processes with its PREFECT_HOME that run Prefect's app)."""
    found = []
    for pid in processes_with_env(f"PREFECT_HOME={home}"):
        try:
            if b"prefect.server.api.server:create_app" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def gone_within(seconds: float, condition) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.fixture
def home(tmp_path):
    """A PREFECT_HOME whose servers are stopped after the test, whatever it left."""
    home = tmp_path / "prefect-home"
    yield home
    for pid in servers(home):
        os.kill(pid, signal.SIGKILL)


def test_runs_share_one_kept_server_that_stops_once_idle(tiny_model, tmp_path, home):
    """Two runs at once launch one server between them (over a stale registration), later runs find it, and
    it stops, unregistered, once no run has used it for the idle time."""
    table = write_table(tmp_path / "t.parquet", ROWS)
    home.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (home / "sdflow-server.json").write_text(json.dumps({"pid": int(dead.stdout), "port": 9, "identity": "x"}))

    first = [generate(tiny_model, table, tmp_path / f"out{i}", env_for(home, 6)) for i in range(2)]
    for process in first:
        finished(process)
    record = registration(home)
    assert record and record["pid"] != int(dead.stdout), "the stale registration was not replaced"
    assert servers(home) == [record["pid"]], "two concurrent runs must share one server, kept after both"

    finished(generate(tiny_model, table, tmp_path / "out2", env_for(home, 6)))
    assert registration(home) == record and servers(home) == [record["pid"]], "a later run must find the same server"
    with sqlite3.connect(home / "prefect.db") as db:
        states = db.execute("SELECT state_type FROM flow_run").fetchall()
    assert states == [("COMPLETED",)] * 3

    assert gone_within(6 + 20, lambda: not servers(home)), "the server must stop once idle"
    assert registration(home) is None


def test_a_registration_whose_pid_now_runs_another_program_is_not_trusted(tiny_model, tmp_path, home):
    """The registered pid reused by another program with the registered port among its arguments (an HTTP server
    here): the run launches a server of its own (it had waited 90 s for an answer, then failed with exit 2), and
    leaves the other program alone."""
    from flows.server import free_port

    table = write_table(tmp_path / "t.parquet", ROWS)
    finished(generate(tiny_model, table, tmp_path / "out0", env_for(home, 30)))
    identity = registration(home)["identity"]  # the server this PREFECT_HOME's runs would attach to ...
    for pid in servers(home):  # ... gone, its pid reused by another program
        os.kill(pid, signal.SIGKILL)
    assert gone_within(20, lambda: not servers(home))
    port = free_port()
    other = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (home / "sdflow-server.json").write_text(json.dumps({"pid": other.pid, "port": port, "identity": identity}))
        finished(generate(tiny_model, table, tmp_path / "out1", env_for(home, 30)))
        assert registration(home)["pid"] in servers(home), "the run must have launched and registered a server of its own"
        assert other.poll() is None, "the other program must be left running"
    finally:
        other.kill()
        other.wait()


def test_a_killed_run_does_not_keep_the_server_alive(tiny_model, tmp_path, home):
    """The lease is a lock the kernel drops with the process: a run killed by SIGKILL releases it too."""
    table = write_table(tmp_path / "t.parquet", ROWS * 4)
    process = generate(tiny_model, table, tmp_path / "out", env_for(home, 2))
    assert gone_within(120, lambda: bool(servers(home)) or process.poll() is not None) and process.poll() is None
    process.kill()
    process.wait()
    assert servers(home), "the kept server outlives the run that launched it"
    assert gone_within(2 + 20, lambda: not servers(home)), "a SIGKILLed run must not keep the server alive"


def test_other_server_settings_get_a_server_of_their_own(tiny_model, tmp_path, home):
    """A run whose Prefect server settings differ from the kept server's does not use it, nor stop it."""
    table = write_table(tmp_path / "t.parquet", ROWS)
    finished(generate(tiny_model, table, tmp_path / "out1", env_for(home, 60)))
    record = registration(home)
    other = env_for(home, 60, PREFECT_SERVER_API_KEEPALIVE_TIMEOUT="7")
    finished(generate(tiny_model, table, tmp_path / "out2", other))
    assert registration(home) == record and servers(home) == [record["pid"]], "its own server stops with it"


def test_an_idle_time_that_is_not_a_number_is_named(tiny_model, tmp_path, home):
    table = write_table(tmp_path / "t.parquet", ROWS)
    process = generate(tiny_model, table, tmp_path / "out", env_for(home, 10) | {"SDFLOW_SERVER_IDLE_SECONDS": "ten"})
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    assert err.startswith("sdflow: error: SDFLOW_SERVER_IDLE_SECONDS='ten' is not a number of seconds")
    assert "Traceback" not in err and not (tmp_path / "out").exists() and not servers(home)
