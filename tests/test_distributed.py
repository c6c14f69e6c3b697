"""Beyond one machine, on loopback: a real Prefect server, process work pools, deployments, two GPU-side workers.

One worker is killed with SIGKILL in the middle of a shard; the run must still complete with every row
exactly once, the lost shard generated again and no committed shard generated twice, and the dataset must
equal the single-machine run's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.generate import generate_dataset
from tests.support.tables import write_table
from tests.support.runs import images_by_id

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROWS = [{"id": f"p{i}", "prompt": f"a {['red', 'blue'][i % 2]} circle, number {i}", "note": i} for i in range(24)]
# 6 shards of 4 rows, 2 batches a shard, 2 steps a batch: the killed worker dies on its 3rd denoise step,
# in the second batch of its first shard.
RUN = {"batch_size": 2, "shard_size": 4, "steps": 2, "scheduler": "euler_a"}
CRASH_AT = "denoise-step:3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Processes of a small Prefect cluster on loopback; all of them are killed at the end."""

    def __init__(self, home: Path, logs: Path):
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.logs = logs
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_UI_ENABLED": "false",
            "SDFLOW_HOME": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
        }
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str, **env: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        process = subprocess.Popen(
            args, cwd=ROOT, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes[name] = process
        return process

    def run(self, *args: str, timeout: float = 180) -> str:
        done = subprocess.run(args, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def get(self, path: str, method: str = "POST", **body):
        response = httpx.request(method, f"{self.api}{path}", json=body or None, timeout=30)
        response.raise_for_status()
        return response.json()

    def wait(self, what: str, check, timeout: float = 240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if value := check():
                    return value
            except (httpx.HTTPError, OSError):
                pass
            for name, process in self.processes.items():
                if process.poll() is not None and name != "doomed-worker":
                    pytest.fail(f"{name} exited ({process.returncode}) while waiting for {what}:\n{self.log(name)}")
            time.sleep(0.5)
        try:
            runs = [(r["name"], r["state_type"]) for r in self.get("/task_runs/filter") if r["name"].startswith("shard-")]
            workers = [w["identifier"] for w in self.get("/task_workers/filter")]
        except httpx.HTTPError as e:
            runs = workers = repr(e)
        status = {name: p.poll() for name, p in self.processes.items()}
        pytest.fail(f"timed out waiting for {what}: shard runs {runs}, live workers {workers}, processes {status}")

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self):
        # Process workers start each flow run in a session of its own: find them as descendants first.
        doomed = set()
        for process in self.processes.values():
            doomed |= descendants(process.pid) | {process.pid}
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.processes.values():
            process.wait()


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@pytest.fixture
def cluster(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    cluster = Cluster(tmp_path / "prefect-home", logs)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_two_workers_one_killed_mid_shard_give_the_single_machine_dataset(cluster, prefect_api, tiny_model, tmp_path):
    table = write_table(tmp_path / "prompts.parquet", ROWS)
    reference = tmp_path / "reference"
    generate_dataset(prompts=table, out=str(reference), model=tiny_model, **RUN)  # one machine, in-process

    prefect = str(BIN / "prefect")
    cluster.start("server", prefect, "server", "start", "--host", "127.0.0.1", "--port", str(cluster.port))
    cluster.wait("the server", lambda: httpx.get(f"{cluster.api}/health", timeout=5).status_code == 200)
    for pool in ("cpu", "gpu"):
        cluster.run(prefect, "work-pool", "create", pool, "--type", "process")
    cluster.run(prefect, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all")
    cluster.start("cpu-worker", prefect, "worker", "start", "--pool", "cpu")
    cluster.start("gpu-pool-worker", prefect, "worker", "start", "--pool", "gpu")

    # Two GPU-side workers for pool "test": one as a deployment run on the GPU work pool, one started by hand
    # that SIGKILLs itself mid-shard (SDFLOW_CRASH_AT: os.kill(own pid, SIGKILL)).
    cluster.run(prefect, "deployment", "run", "shard-worker/gpu-worker", "--param", "pool=test", "--param", "device=cpu")
    doomed = cluster.start("doomed-worker", str(BIN / "sdflow"), "-v", "worker", "--pool", "test", SDFLOW_CRASH_AT=CRASH_AT)
    doomed_id = f"{socket.gethostname()}-{doomed.pid}"
    workers = lambda: {w["identifier"] for w in cluster.get("/task_workers/filter")}  # noqa: E731
    live = cluster.wait("two live shard workers", lambda: w if len(w := workers()) == 2 else None)
    assert doomed_id in live

    out = tmp_path / "distributed"
    params = {"prompts": table, "out": str(out), "model": tiny_model, "pool": "test", "seed": 0, **RUN}
    for key in ("guidance", "negative_prompt", "width", "height"):
        params[key] = None  # the deployment's own example values are not this run's
    deployment = cluster.get("/deployments/name/generate-dataset/prompts-to-images", method="GET")
    run = cluster.get(f"/deployments/{deployment['id']}/create_flow_run", parameters=params)

    def finished():
        state = cluster.get(f"/flow_runs/{run['id']}", method="GET")["state"]
        return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    state = cluster.wait("the generation flow run", finished, timeout=420)
    assert state["type"] == "COMPLETED", (state, cluster.log("cpu-worker")[-4000:])
    assert doomed.wait(timeout=5) == -signal.SIGKILL  # it really died mid-run

    # Every row exactly once, and the same images as on one machine.
    data = pq.read_table(out / "data")
    assert sorted(data.column("id").to_pylist()) == sorted(r["id"] for r in ROWS)
    assert sorted(data.column("note").to_pylist()) == sorted(r["note"] for r in ROWS)
    got, want = images_by_id(out), images_by_id(reference)
    assert got.keys() == want.keys()
    assert max(int(np.abs(got[k].astype(int) - want[k].astype(int)).max()) for k in want) <= 1

    # Shards lost with the worker (the one it was generating, and any it had taken off the queue) ran again
    # on the survivor; every shard was completed by exactly one run, so no committed shard ran twice.
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"]["in_dataset"] == len(ROWS) and len(manifest["shards"]) == 6
    shard_runs = [
        r for r in cluster.get("/task_runs/filter", flow_runs={"id": {"any_": [run["id"]]}}) if r["name"].startswith("shard-")
    ]
    attempts: dict[int, list[str]] = {}
    for r in shard_runs:
        attempts.setdefault(int(r["name"].split("-")[1]), []).append(r["state_type"])
    assert sorted(attempts) == sorted(m["shard"] for m in manifest["shards"])
    assert all(states.count("COMPLETED") == 1 for states in attempts.values()), attempts
    assert all(set(states) <= {"COMPLETED", "CRASHED"} for states in attempts.values()), attempts
    lost = [index for index, states in attempts.items() if "CRASHED" in states]
    assert lost, attempts
    markers = {m["shard"]: m for m in (json.loads(p.read_text()) for p in (out / "_shards").glob("*.json"))}
    assert all(markers[index]["worker"] != doomed_id for index in lost)
    assert all(m["model_loads"] == 1 for m in markers.values())  # warm workers: one load each
