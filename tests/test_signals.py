"""Stopping a real `sdflow generate` mid-run: SIGTERM, SIGINT, a terminal's Ctrl-C to the process group, a dead server.

Each run is a subprocess on its own temporary Prefect server (a PREFECT_HOME of its own, which marks every
process of the run in /proc). A signal must end it within seconds, exit 128 + N with one line on stderr,
leave no process behind, record no row as failed, and leave a dataset that a rerun completes exactly: every
row once, with the images of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.support.runs import assert_consistent, images_by_id, processes_with_env, uninterrupted_run

ROWS = [{"id": f"s{i}", "prompt": f"a {['red', 'blue', 'green'][i % 3]} circle number {i}"} for i in range(16)]
RUN = {"batch_size": 2, "shard_size": 4, "steps": 3, "scheduler": "euler_a"}  # 4 shards of 2 batches
STOP_WITHIN = 10.0  # seconds from the signal to the exit


@pytest.fixture(scope="module")
def reference(prefect_api, tiny_model, tmp_path_factory):
    """The table and the images of an uninterrupted run."""
    return uninterrupted_run(tmp_path_factory.mktemp("signals-reference"), ROWS, tiny_model, RUN)


def command(tiny_model: str, prompts: str, out: Path) -> list[str]:
    options = [f"--{k.replace('_', '-')}={v}" for k, v in RUN.items()]
    return [sys.executable, "-m", "flows.cli", "generate", prompts, str(out), "--model", tiny_model, *options]


def own_server_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def default_stop_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def start_mid_run(tiny_model: str, prompts: str, out: Path, home: Path, err: Path, **popen) -> subprocess.Popen:
    """The command, returned once its first shard is committed (three more to go). Its stop signals start at their
    defaults, as in a terminal: a test runner started in the background (`cmd &`) has SIGINT ignored, which its
    children inherit, and sdflow keeps an ignored signal ignored (as under nohup)."""
    process = subprocess.Popen(
        command(tiny_model, prompts, out), env=own_server_env(home), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=err.open("w"), preexec_fn=default_stop_signals, **popen,
    )
    deadline = time.monotonic() + 300
    while not (out / "_shards").exists():
        assert process.poll() is None, f"it ended before it could be stopped: {err.read_text()}"
        assert time.monotonic() < deadline, "no shard committed in 300 s"
        time.sleep(0.05)
    return process


def stop(process: subprocess.Popen, send) -> tuple[int, float]:
    """Send the signal; the exit code and the seconds until the exit."""
    sent = time.monotonic()
    send()
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        code = None
    return code, time.monotonic() - sent


def assert_rerun_completes_exactly(tiny_model: str, reference, out: Path, home: Path) -> None:
    """Nothing half-made was committed, no row was failed by the signal, and a rerun gives the uninterrupted dataset."""
    prompts, expected = reference
    for marker in (out / "_shards").glob("*.json"):
        assert json.loads(marker.read_text())["failed"] == [], "a signal was recorded as a row failure"
    rerun = subprocess.run(command(tiny_model, prompts, out), env=own_server_env(home), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    manifest = assert_consistent(out)
    assert manifest["failed_rows"] == []
    ids = pq.read_table(out / "data").column("id").to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in ROWS), "every row exactly once"
    images = images_by_id(out)
    for row_id, image in expected.items():
        np.testing.assert_array_equal(images[row_id], image, err_msg=row_id)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_signal_stops_the_run_in_order_and_a_rerun_completes_it(tiny_model, reference, tmp_path, signum):
    out, home, err = tmp_path / "out", tmp_path / "prefect-home", tmp_path / "stderr"
    process = start_mid_run(tiny_model, reference[0], out, home, err)
    code, seconds = stop(process, lambda: os.kill(process.pid, signum))
    print(f"{signal.Signals(signum).name}: exit {code} after {seconds:.2f} s")
    text = err.read_text()
    assert code == 128 + signum, text
    assert seconds < STOP_WITHIN
    assert text == f"sdflow: error: stopped by {signal.Signals(signum).name}; the shards committed so far are kept: rerun to finish.\n"
    assert processes_with_env(f"PREFECT_HOME={home}") == [], "the temporary server must stop with the command"
    assert_rerun_completes_exactly(tiny_model, reference, out, home)


def test_ctrl_c_to_the_process_group(tiny_model, reference, tmp_path):
    """A terminal's Ctrl-C reaches every process of its foreground group: the command, and its server unless apart."""
    out, home, err = tmp_path / "out", tmp_path / "prefect-home", tmp_path / "stderr"
    process = start_mid_run(tiny_model, reference[0], out, home, err, start_new_session=True)  # a group of its own
    code, seconds = stop(process, lambda: os.killpg(process.pid, signal.SIGINT))
    print(f"group SIGINT: exit {code} after {seconds:.2f} s")
    text = err.read_text()
    assert code == 130, text
    assert seconds < STOP_WITHIN
    assert text == "sdflow: error: stopped by SIGINT; the shards committed so far are kept: rerun to finish.\n"
    assert processes_with_env(f"PREFECT_HOME={home}") == []
    assert_rerun_completes_exactly(tiny_model, reference, out, home)


@pytest.mark.parametrize("kept", [False, True], ids=["its-own", "kept-found-running"])
def test_server_killed_mid_run_stops_the_run_in_one_paragraph(tiny_model, reference, tmp_path, monkeypatch, kept):
    """The run's own server (its child), or a kept server an earlier run launched (which the run watches by pid)."""
    out, home, err = tmp_path / "out", tmp_path / "prefect-home", tmp_path / "stderr"
    if kept:  # an earlier, quick run launches the kept server
        monkeypatch.setenv("SDFLOW_SERVER_IDLE_SECONDS", "60")
        primer = [*command(tiny_model, reference[0], tmp_path / "primer"), "--steps=1"]
        assert subprocess.run(primer, env=own_server_env(home), capture_output=True, timeout=300).returncode == 0
    process = start_mid_run(tiny_model, reference[0], out, home, err)
    servers = [pid for pid in processes_with_env(f"PREFECT_HOME={home}") if pid != process.pid]
    assert len(servers) == 1
    code, seconds = stop(process, lambda: os.kill(servers[0], signal.SIGKILL))
    print(f"server killed: exit {code} after {seconds:.2f} s")
    text = err.read_text()
    assert code == 1, text
    assert seconds < STOP_WITHIN
    assert text.startswith("sdflow: error: Prefect's temporary API server") and "Traceback" not in text
    ended = "exited in the middle of the run" if kept else "exited with code -9 in the middle of the run"
    assert ended in " ".join(text.split())
    assert len(text.strip().split("\n\n")) == 1 and len(text) < 1000, text
    assert processes_with_env(f"PREFECT_HOME={home}") == []
    assert_rerun_completes_exactly(tiny_model, reference, out, home)
    for pid in processes_with_env(f"PREFECT_HOME={home}"):  # the rerun's kept server
        os.kill(pid, signal.SIGKILL)


def test_a_signal_the_caller_ignores_stays_ignored():
    """`nohup sdflow generate ... &`: the hangup at logout must not stop the run (nohup sets SIGHUP to ignored)."""
    script = (
        "import os, signal, time\n"
        "from flows.cli import stop_on_signals\n"
        "stop_on_signals()\n"
        "os.kill(os.getpid(), signal.SIGHUP)\n"
        "time.sleep(0.2)\n"
        "print('survived')\n"
    )
    ignoring = subprocess.run(
        ["nohup", sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=os.getcwd()
    )
    assert ignoring.stdout.strip() == "survived", ignoring.stderr
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0 and "survived" not in plain.stdout  # without nohup the hangup still stops it
