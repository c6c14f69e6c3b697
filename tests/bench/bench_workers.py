"""Warm workers: `sdflow generate --pool` on W long-lived task workers, against the same run in one process.

    python tests/bench/bench_workers.py [--rows 96] [--steps 10] [--batch-size 8] [--shard-size 16]
        [--workers 1,2] [--repeats R] [--keep] [--workdir DIR] ...

Starts a real Prefect server on loopback (`prefect server start --host 127.0.0.1 --port FREE`, SQLite in a
fresh PREFECT_HOME), builds the `medium` toy model (bench_throughput's SIZES["medium"], nothing downloaded)
and a Parquet prompt table of N rows (id, prompt, seed), then for each W of --workers:

  - starts W `sdflow worker --pool bench --device cpu` processes, each with OMP_NUM_THREADS=1 and
    MKL_NUM_THREADS=1 (one CPU thread each: a stand-in for one GPU each), waits until the server lists them,
  - times `sdflow generate TABLE OUT_W --pool bench --model M --steps S --batch-size B --shard-size K`, wall
    clock from process start to exit (the workers are up but have not loaded the model: each pays one load),
  - stops the workers.

For reference it also times the same `sdflow generate` without --pool (in one process, against the same
server) with OMP_NUM_THREADS=2: the whole machine, the single-machine path.

It prints per W the wall seconds, images/s and the speed-up over the first W (target for 2 over 1: >= 1.8x);
from the shard markers (OUT/_shards/*.json): shards per worker, model loads per worker (the largest
`model_loads` of its markers; target 1) and images/s per shard; from the server's task runs: a breakdown of
the wall time (parent start-up and planning, delivery of the first shard, each worker's busy and idle time,
each worker's extra time on its first shard, the tail after the last shard), a timeline of the shard runs
(created, started, ended, on which worker) and how long a worker sat idle while a shard waited on another,
busy worker (Prefect hands queued task runs to busy workers too); CPU seconds of the parent, the server, the
workers and everything else on the machine (other users); a worker's cold-start costs measured alone; and
whether every configuration made the same dataset (ids, and the largest uint8 pixel difference).

A standalone script, not a test: it asserts nothing. On a shared machine timings are noisy: the load average
is printed before and after each run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))  # nodes.shapes.builders, also when the package is not installed
sys.path.insert(0, str(HERE))

from bench_throughput import COMMON_ENV, build_model, close_workdir, write_prompt_table  # noqa: E402  (SIZES['medium'])

POOL = "bench"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=96, help="prompt-table rows = images per run (default: 96)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps (default: 10)")
    p.add_argument("--batch-size", type=int, default=8, help="images per U-Net batch (default: 8)")
    p.add_argument("--shard-size", type=int, default=16, help="rows per shard = per task run (default: 16)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts to try (default: 1,2)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the in-process reference run (default: 2)")
    p.add_argument("--no-inprocess", action="store_true", help="skip the in-process reference run")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed 1-row in-process run first")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each configuration, alternating order (default: 1)")
    p.add_argument("--sdflow-command", help="run this instead of `sdflow` (e.g. 'python my_cli.py'), to try a change")
    p.add_argument("--workdir", help="where model, table, Prefect home, outputs and logs go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (model, outputs, logs)")
    args = p.parse_args(argv)
    args.worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    if not args.worker_counts or min(args.worker_counts) < 1:
        p.error("--workers: a comma-separated list of counts >= 1")
    return args


# --- processes ------------------------------------------------------------------------------------------


class Processes:
    """Everything this script starts, each in its own process group; `stop_all` ends them at exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
        out = open(log, "ab")
        try:
            proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        finally:
            out.close()  # the child has its own copy
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
        """SIGINT the process group (Prefect's and sdflow's clean stop), then SIGTERM, then SIGKILL."""
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # children left in the group (uvicorn under `prefect server start`)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc, grace=5.0)
        self.procs.clear()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process and the children it has waited for (from /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks  # utime stime cutime cstime


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds of every live process in a process group (the server is a CLI with a uvicorn child)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of stat: pgrp
            total += sum(int(fields[i]) for i in (11, 12)) / os.sysconf("SC_CLK_TCK")
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (from /proc/stat), to tell our load from others'."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, path: str, body: dict | None = None, timeout: float = 10.0):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url + path, data=data, method="GET" if body is None else "POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def start_server(procs: Processes, env: dict, work: Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    cmd = [prefect_exe(), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    started = time.perf_counter()
    server = procs.start(cmd, env, work / "logs" / "server.log")
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"prefect server exited with {server.returncode}; see {work / 'logs' / 'server.log'}")
        try:
            if api(url, "/health", timeout=2) is True:
                return server, url, time.perf_counter() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"prefect server did not answer /api/health in 120 s; see {work / 'logs' / 'server.log'}")


def live_workers(url: str) -> set[str]:
    workers = api(url, "/task_workers/filter", {"task_worker_filter": {"task_keys": []}})
    return {w["identifier"] for w in workers}


def prefect_exe() -> str:
    exe = Path(sys.executable).with_name("prefect")
    return str(exe) if exe.exists() else (shutil.which("prefect") or "prefect")


def sdflow_cmd(args) -> list[str]:
    if args.sdflow_command:
        return args.sdflow_command.split()
    exe = Path(sys.executable).with_name("sdflow")
    return [str(exe) if exe.exists() else (shutil.which("sdflow") or "sdflow")]


# --- one configuration -----------------------------------------------------------------------------------


@dataclass
class Result:
    name: str  # "W=1", "W=2", "in-process"
    workers: int  # 0: in-process
    repeat: int
    wall: float
    images: int
    out: Path
    launched: float  # epoch
    load_before: float
    load_after: float
    parent_cpu: float
    server_cpu: float
    worker_cpu: dict = field(default_factory=dict)  # identifier -> CPU s during the run
    worker_start: dict = field(default_factory=dict)  # identifier -> seconds from process start to listed by the server
    markers: list = field(default_factory=list)
    runs: list = field(default_factory=list)  # the server's shard task runs of this run
    flow_run: dict | None = None
    manifest: dict = field(default_factory=dict)
    machine_cpu: float = float("nan")  # CPU seconds the whole machine spent busy during the run

    @property
    def rate(self) -> float:
        return self.images / self.wall


def timed_generate(args, env: dict, cmd: list[str], log: Path) -> tuple[float, float, float, int]:
    """Run to completion; returns (launch epoch, wall seconds, CPU seconds, exit code)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "wb") as out:
        launched = time.time()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            code = proc.wait()
        except BaseException:
            proc.kill()
            raise
        wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return launched, wall, cpu, code


def generate_command(args, table: Path, out: Path, model: Path, steps: int, pool: str | None) -> list[str]:
    cmd = sdflow_cmd(args) + ["generate", str(table), str(out)]
    if pool:
        cmd += ["--pool", pool]
    cmd += ["--model", str(model), "--steps", str(steps), "--batch-size", str(args.batch_size)]
    cmd += ["--shard-size", str(args.shard_size)]
    return cmd


def run_config(args, procs: Processes, env: dict, server, url: str, work: Path, model: Path, table: Path,
               workers: int, repeat: int) -> Result:
    name = f"W={workers}" if workers else "in-process"
    tag = (f"w{workers}" if workers else "inproc") + f"-r{repeat}"
    out = work / "out" / tag
    if out.exists():
        shutil.rmtree(out)
    logs = work / "logs"

    started_workers: list[subprocess.Popen] = []
    worker_start: dict[str, float] = {}
    try:
        if workers:
            wenv = dict(env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            before = live_workers(url)
            launched_at = {}
            for i in range(workers):
                # Warm workers: long-lived, model loaded before the run (sdflow worker --model)
                cmd = sdflow_cmd(args) + ["worker", "--pool", POOL, "--device", "cpu", "--model", str(model)]
                proc = procs.start(cmd, wenv, logs / f"worker-{tag}-{i}.log")
                started_workers.append(proc)
                launched_at[proc.pid] = time.perf_counter()
            ids = {f"{socket.gethostname()}-{p.pid}": p for p in started_workers}
            deadline = time.monotonic() + 180
            while True:
                listed = live_workers(url) - before
                for ident in listed & ids.keys():
                    worker_start.setdefault(ident, time.perf_counter() - launched_at[ids[ident].pid])
                if ids.keys() <= listed:
                    break
                dead = [p for p in started_workers if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    why = f"exited with {dead[0].returncode}" if dead else "not listed by the server after 180 s"
                    raise SystemExit(f"{name}: a worker {why}; see {logs}/worker-{tag}-*.log")
                time.sleep(0.2)
            time.sleep(1.0)  # let their first subscription settle (the server re-lists a worker every second)
        cpu0 = {f"{socket.gethostname()}-{p.pid}": cpu_seconds(p.pid) for p in started_workers}
        server_cpu0 = group_cpu_seconds(server.pid)
        load_before = os.getloadavg()[0]
        busy0 = machine_busy_seconds()
        genv = dict(env) if workers else dict(env, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        cmd = generate_command(args, table, out, model, args.steps, POOL if workers else None)
        print(f"  {name} run {repeat + 1}: {' '.join(cmd)}", flush=True)
        launched, wall, parent_cpu, code = timed_generate(args, genv, cmd, logs / f"generate-{tag}.log")
        load_after = os.getloadavg()[0]
        machine_cpu = machine_busy_seconds() - busy0
        server_cpu = group_cpu_seconds(server.pid) - server_cpu0
        worker_cpu = {ident: cpu_seconds(int(ident.rsplit("-", 1)[1])) - c for ident, c in cpu0.items()}
    finally:
        for proc in started_workers:
            Processes.stop(proc)
        if started_workers:  # wait until the server forgets them, so the next W's parent counts only its own
            gone = {f"{socket.gethostname()}-{p.pid}" for p in started_workers}
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    if not (live_workers(url) & gone):
                        break
                except Exception:
                    break
                time.sleep(0.5)
    if code != 0:
        tail = (logs / f"generate-{tag}.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{name}: sdflow generate failed with exit code {code}\n--- tail ---\n{tail}")

    manifest = json.loads((out / "manifest.json").read_text())
    markers = [json.loads(p.read_text()) for p in sorted((out / "_shards").glob("*.json"))]
    result = Result(
        name, workers, repeat, wall, manifest["rows"]["generated"], out, launched, load_before, load_after,
        parent_cpu, server_cpu, worker_cpu, worker_start, markers, manifest=manifest, machine_cpu=machine_cpu,
    )
    if workers:
        result.runs, result.flow_run = shard_runs(url, launched, launched + wall)
    print(f"    {wall:.1f} s, {result.rate:.2f} images/s (load average {load_before:.2f} -> {load_after:.2f})", flush=True)
    return result


COLD_START = r"""
import json, sys, time
t0 = time.perf_counter()
import flows.fanout  # what `sdflow worker` has imported when it subscribes
t1 = time.perf_counter()
import flows.generate  # what unpickling the first ShardRequest adds (its RunConfig lives there)
t2 = time.perf_counter()
import torch
from nodes.pipeline.components import inspect_model, load_components, resolve_device, resolve_dtype
info = inspect_model(sys.argv[1], {})
device = resolve_device("cpu")
components = load_components(info, device, resolve_dtype(None, device))
t3 = time.perf_counter()
print(json.dumps({"import_fanout": t1 - t0, "import_generate": t2 - t1, "model_load": t3 - t2,
                  "load_seconds": components.load_seconds, "threads": torch.get_num_threads()}))
"""


def cold_start(env: dict, model: Path, log: Path) -> dict | None:
    """A worker's first-shard costs measured alone, in a fresh process on one thread."""
    wenv = dict(env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(log, "wb") as err:
        proc = subprocess.run([sys.executable, "-c", COLD_START, str(model)], env=wenv, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=err, timeout=300)
    try:
        return json.loads(proc.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def parse_time(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def shard_runs(url: str, since: float, until: float) -> tuple[list[dict], dict | None]:
    """The shard task runs created during [since, until], with epoch times; and their parent flow run."""
    runs = api(url, "/task_runs/filter", {"task_runs": {"name": {"like_": "shard-"}}, "limit": 200, "sort": "EXPECTED_START_TIME_ASC"})
    mine = []
    for r in runs:
        created = parse_time(r.get("created"))
        if created is None or not (since - 1 <= created <= until + 1):
            continue
        mine.append({
            "name": r["name"],
            "flow_run_id": r.get("flow_run_id"),
            "created": created,
            "start": parse_time(r.get("start_time")),
            "end": parse_time(r.get("end_time")),
            "state": (r.get("state") or {}).get("type"),
            "id": r["id"],
        })
    flow_run = None
    ids = {r["flow_run_id"] for r in mine if r["flow_run_id"]}
    if len(ids) == 1:
        fr = api(url, f"/flow_runs/{ids.pop()}")
        flow_run = {"start": parse_time(fr.get("start_time")), "end": parse_time(fr.get("end_time"))}
    return sorted(mine, key=lambda r: r["created"]), flow_run


# --- reporting ------------------------------------------------------------------------------------------


def read_images(out: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((out / "data").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(p, columns=["id", "image"]) for p in files]).to_pydict()
    return {row_id: image["bytes"] for row_id, image in zip(table["id"], table["image"])}


def compare_datasets(a: Path, b: Path) -> str:
    import numpy as np
    from PIL import Image

    ours, theirs = read_images(a), read_images(b)
    if ours.keys() != theirs.keys():
        return (f"ids DIFFER: {len(ours)} vs {len(theirs)} rows, {len(ours.keys() - theirs.keys())} only in the first, "
                f"{len(theirs.keys() - ours.keys())} only in the second")
    worst, differing, same_bytes = 0, 0, 0
    for row_id, data in ours.items():
        same_bytes += data == theirs[row_id]
        x = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
        y = np.asarray(Image.open(io.BytesIO(theirs[row_id])).convert("RGB"), dtype=np.int16)
        if x.shape != y.shape:
            return f"same ids, but image sizes differ: {x.shape} vs {y.shape}"
        diff = int(np.abs(x - y).max())
        worst = max(worst, diff)
        differing += diff > 0
    return (f"same {len(ours)} ids; largest pixel difference {worst} (uint8), {differing} image(s) differ, "
            f"{same_bytes} identical PNG files")


def worker_table(r: Result) -> list[str]:
    """Per worker: shards, images, model loads, images/s per shard, busy/idle time, estimated model load."""
    lines = []
    by_worker: dict[str, list[dict]] = {}
    for m in r.markers:
        by_worker.setdefault(m.get("worker", "?"), []).append(m)
    for worker in sorted(r.worker_cpu.keys() - by_worker.keys()):
        lines.append(f"    {worker:>22}  shards  0: idle for the whole run; CPU {r.worker_cpu[worker]:.1f} s")
    runs_by_shard = {}
    for run in r.runs:
        index = int(run["name"].split("-")[1])
        if run["state"] == "COMPLETED":
            runs_by_shard[index] = run
    end = r.launched + r.wall
    for worker, ms in sorted(by_worker.items()):
        ms = sorted(ms, key=lambda m: (runs_by_shard.get(m["shard"], {}).get("start") or 0, m["shard"]))
        rates = [m["images_per_second"] for m in ms]
        secs = [m["seconds"] for m in ms]
        loads = max(m.get("model_loads", 0) for m in ms)
        spans = [(runs_by_shard[m["shard"]]["start"], runs_by_shard[m["shard"]]["end"]) for m in ms
                 if m["shard"] in runs_by_shard and runs_by_shard[m["shard"]]["start"] and runs_by_shard[m["shard"]]["end"]]
        busy = sum(e - s for s, e in spans)
        gaps = [spans[i + 1][0] - spans[i][1] for i in range(len(spans) - 1)]
        first_start = spans[0][0] - r.launched if spans else float("nan")
        tail = end - spans[-1][1] if spans else float("nan")
        load_est = secs[0] - statistics.median(secs[1:]) if len(secs) > 1 else float("nan")
        cpu = r.worker_cpu.get(worker, float("nan"))
        listed = r.worker_start.get(worker, float("nan"))
        lines.append(
            f"    {worker:>22}  shards {len(ms):2} ({','.join(str(m['shard']) for m in ms)})  images {sum(m['rows'] for m in ms):4}"
            f"  model loads {loads}  img/s per shard mean {statistics.mean(rates):.2f} (first {rates[0]:.2f},"
            f" {min(rates):.2f}-{max(rates):.2f})"
        )
        lines.append(
            f"    {'':>22}  busy {busy:6.1f} s, idle {r.wall - busy:5.1f} s = before first shard {first_start:5.1f}"
            f" + between shards {sum(gaps):4.1f} (max {max(gaps, default=0):.1f}) + after last {tail:5.1f};"
            f" first shard {secs[0]:.1f} s vs median of the rest {statistics.median(secs[1:]) if len(secs) > 1 else float('nan'):.1f} s"
            f" -> first-shard extra (imports, model load, warm-up) ~{load_est:.1f} s; CPU {cpu:.1f} s; worker up (start to listed) {listed:.1f} s"
        )
    return lines


def overlap(a: tuple[float, float], intervals: list[tuple[float, float]]) -> float:
    """Seconds of interval `a` covered by the union of `intervals`."""
    spans = sorted((max(a[0], s), min(a[1], e)) for s, e in intervals if min(a[1], e) > max(a[0], s))
    total, reach = 0.0, a[0]
    for s, e in spans:
        s = max(s, reach)
        if e > s:
            total += e - s
            reach = e
    return total


def timeline(r: Result) -> list[str]:
    """Each shard run (seconds from process start): created, started, ended, on which worker; and the idle time of
    workers while shards they could have run waited for (were held by) another worker."""
    if not r.runs:
        return []
    worker_of = {m["shard"]: m.get("worker", "?") for m in r.markers}
    t0, end = r.launched, r.launched + r.wall
    lines = ["    timeline (s from process start): " + "; ".join(
        f"{x['name'].split('-')[1].lstrip('0') or '0'}: {x['created'] - t0:.1f}/{(x['start'] or float('nan')) - t0:.1f}/"
        f"{(x['end'] or float('nan')) - t0:.1f} {worker_of.get(int(x['name'].split('-')[1]), '?').rsplit('-', 1)[-1]}"
        for x in r.runs) + "  (shard: created/started/ended worker-pid)"]
    done = [x for x in r.runs if x["start"] and x["end"]]
    workers = sorted({worker_of.get(int(x["name"].split("-")[1]), "?") for x in done} | r.worker_cpu.keys())
    if len(workers) < 2:
        return lines
    stranded, busy_total = {}, 0.0
    for w in workers:
        mine = sorted((x["start"], x["end"]) for x in done if worker_of.get(int(x["name"].split("-")[1])) == w)
        busy_total += sum(e - s for s, e in mine)
        if mine:
            idle = [(mine[i][1], mine[i + 1][0]) for i in range(len(mine) - 1)] + [(mine[-1][1], end)]
        else:  # it never got a shard
            idle = [(t0, end)]
        waiting = [(x["created"], x["start"]) for x in done if worker_of.get(int(x["name"].split("-")[1])) != w]
        stranded[w] = sum(overlap(i, waiting) for i in idle)
    first = min(x["start"] for x in done)
    balanced = (first - t0) + busy_total / len(workers) + (end - max(x["end"] for x in done))
    lines.append(
        "    idle while a shard waited on another (busy) worker: "
        + ", ".join(f"{w.rsplit('-', 1)[-1]} {v:.1f} s" for w, v in stranded.items())
        + f"; with the same busy time spread evenly the run would take ~{balanced:.1f} s (vs {r.wall:.1f} s)"
    )
    return lines


def run_breakdown(r: Result) -> list[str]:
    if not r.runs:
        return ["    (no shard task runs found on the server)"]
    end = r.launched + r.wall
    created = [x["created"] for x in r.runs]
    starts = [x["start"] for x in r.runs if x["start"]]
    ends = [x["end"] for x in r.runs if x["end"]]
    fr = r.flow_run or {}
    lines = []
    parts = []
    if fr.get("start"):
        parts.append(f"process start -> flow run start {fr['start'] - r.launched:.1f} s")
        parts.append(f"-> first shard run created {created[0] - fr['start']:.1f} s (planning)")
    else:
        parts.append(f"process start -> first shard run created {created[0] - r.launched:.1f} s")
    parts.append(f"-> first shard started on a worker {min(starts) - created[0]:.2f} s")
    lines.append("    " + " ".join(parts))
    # How long each shard waited for the parent to create it after a worker freed up, and in the queue.
    queue_waits = [x["start"] - x["created"] for x in r.runs if x["start"]]
    lines.append(
        f"    shard runs: {len(r.runs)} ({sum(1 for x in r.runs if x['state'] == 'COMPLETED')} completed); "
        f"created over {created[-1] - created[0]:.1f} s; created -> started: "
        f"{', '.join(f'{w:.1f}' for w in queue_waits)} s"
    )
    tail = [f"last shard run ended -> process exit {end - max(ends):.1f} s"]
    if fr.get("end"):
        tail.append(f"(flow run end at +{fr['end'] - max(ends):.1f} s, then {end - fr['end']:.1f} s to exit)")
    lines.append("    " + " ".join(tail))
    return lines


def report(args, setup: dict, results: list[Result], compares: list[str], server_start: float, load0: float,
           cold: dict | None) -> None:
    print()
    print("sdflow warm-worker benchmark: `sdflow generate --pool` on W task workers, wall clock from start to exit")
    params = setup["params"]
    side = setup["image_side"]
    print(f"  model    : toy 'medium', {sum(params.values()) / 1e6:.2f} M parameters; {side}x{side} images")
    shards = -(-args.rows // args.shard_size)
    print(f"  workload : {args.rows} rows, {args.steps} steps, batch {args.batch_size}, shard {args.shard_size} "
          f"({shards} shards); workers OMP_NUM_THREADS=1 each, in-process OMP_NUM_THREADS={args.threads}")
    print(f"  machine  : {os.cpu_count()} CPUs; load average before {load0:.2f}, after {os.getloadavg()[0]:.2f} "
          f"(1 min); Prefect server on loopback, up in {server_start:.1f} s")
    print()
    header = f"  {'run':12} {'wall s':>7} {'img/s':>6} {'vs W=' + str(results[0].workers if results else 1):>7} {'parent CPU':>10} {'server CPU':>10} {'workers CPU':>11} {'others CPU':>10} {'load':>11}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    first = [r for r in results if r.workers == (args.worker_counts[0])]
    base_rate = statistics.median(r.rate for r in first) if first else None
    for r in results:
        speed = f"{r.rate / base_rate:6.2f}x" if base_rate else ""
        wcpu = sum(r.worker_cpu.values()) if r.worker_cpu else 0.0
        others = r.machine_cpu - r.parent_cpu - r.server_cpu - wcpu
        print(f"  {r.name + ('' if args.repeats == 1 else f' #{r.repeat + 1}'):12} {r.wall:7.1f} {r.rate:6.2f} {speed:>7}"
              f" {r.parent_cpu:10.1f} {r.server_cpu:10.1f} {wcpu:11.1f} {others:10.1f} {r.load_before:5.2f}>{r.load_after:<5.2f}")
    print("  CPU in seconds during the run: the generate process, the Prefect server, the workers, and everything else on")
    print(f"  the machine (other users: {os.cpu_count()} cores x wall s is the most there is); load: 1-min load average before>after.")
    print()
    by_w = {}
    for r in results:
        by_w.setdefault(r.workers, []).append(r)
    if 1 in by_w and 2 in by_w:
        s = statistics.median(r.rate for r in by_w[2]) / statistics.median(r.rate for r in by_w[1])
        print(f"  speed-up W=2 over W=1: {s:.2f}x (target >= 1.8x){'' if s >= 1.8 else '  -- BELOW TARGET'}")
    if 0 in by_w and by_w.keys() - {0}:
        best = max(by_w.keys() - {0})
        s = statistics.median(r.rate for r in by_w[best]) / statistics.median(r.rate for r in by_w[0])
        print(f"  W={best} over in-process ({args.threads} threads): {s:.2f}x")
    for r in results:
        print()
        if r.workers:
            print(f"  {r.name}{'' if args.repeats == 1 else f' #{r.repeat + 1}'}: per worker (from the shard markers and the server's task runs)")
            for line in worker_table(r):
                print(line)
            for line in run_breakdown(r) + timeline(r):
                print(line)
        else:
            t = r.manifest.get("timings", {})
            print(f"  {r.name}: {len(r.markers)} shards, model load {t.get('model_load_seconds', float('nan')):.1f} s, "
                  f"generation {t.get('generation_seconds', float('nan')):.1f} s ({t.get('images_per_second', float('nan')):.2f} images/s), "
                  f"flow {t.get('seconds', float('nan')):.1f} s of {r.wall:.1f} s wall")
    if cold:
        print()
        print(f"  cold start of a worker, alone in a fresh process on 1 thread: import flows.fanout {cold['import_fanout']:.1f} s"
              f" (before it subscribes), then import flows.generate {cold['import_generate']:.1f} s (first request unpickled)"
              f" + model load {cold['model_load']:.1f} s (load_components {cold['load_seconds']:.1f} s)")
    if compares:
        print()
        for line in compares:
            print(f"  images   : {line}")


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sdflow-bench-workers-"))
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("logs", "out"):
        (work / sub).mkdir(exist_ok=True)
    prefect_home = work / "prefect-home"
    if prefect_home.exists():
        shutil.rmtree(prefect_home)
    prefect_home.mkdir()

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(COMMON_ENV)
    env["PREFECT_HOME"] = str(prefect_home)
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(key, None)

    load0 = os.getloadavg()[0]
    procs = Processes()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        print(f"work dir {work}; load average {os.getloadavg()}; building the 'medium' toy model ...", flush=True)
        model = work / "model-medium"
        if model.exists():
            shutil.rmtree(model)
        setup = build_model(model, "medium", args.steps, 7.5)
        table = work / "prompts.parquet"
        write_prompt_table(table, args.rows, 0)

        print("starting the Prefect server ...", flush=True)
        server, url, server_start = start_server(procs, env, work)
        env["PREFECT_API_URL"] = url
        print(f"  {url} up in {server_start:.1f} s", flush=True)

        if not args.no_warmup:
            tiny = work / "warmup.parquet"
            write_prompt_table(tiny, 1, 0)
            cmd = generate_command(args, tiny, work / "out" / "warmup", model, 1, None)
            print("warm-up (1 row, 1 step, in-process, untimed) ...", flush=True)
            _, wall, _, code = timed_generate(args, env, cmd, work / "logs" / "warmup.log")
            if code != 0:
                raise SystemExit(f"warm-up failed ({code}); see {work / 'logs' / 'warmup.log'}")
            print(f"  {wall:.1f} s", flush=True)

        print("cold-start reference (1 thread) ...", flush=True)
        cold = cold_start(env, model, work / "logs" / "cold-start.log")

        configs = list(args.worker_counts) + ([] if args.no_inprocess else [0])
        results: list[Result] = []
        for repeat in range(args.repeats):
            for workers in (configs if repeat % 2 == 0 else configs[::-1]):
                print(f"{'W=' + str(workers) if workers else 'in-process'} (repeat {repeat + 1}/{args.repeats}) ...", flush=True)
                results.append(run_config(args, procs, env, server, url, work, model, table, workers, repeat))

        compares = []
        last = {r.workers: r for r in results}
        ref_key = args.worker_counts[0]
        for key, r in last.items():
            if key != ref_key and ref_key in last:
                compares.append(f"{r.name} vs {last[ref_key].name}: {compare_datasets(r.out, last[ref_key].out)}")
        report(args, setup, results, compares, server_start, load0, cold)
    finally:
        procs.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        close_workdir(args, work)


if __name__ == "__main__":
    main()
