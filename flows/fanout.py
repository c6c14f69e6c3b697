"""Fan-out: a run's shards go to long-lived Prefect task workers, one per GPU, that keep the model loaded.

Parent (the generation flow with `pool`): plans as usual, then creates one background task run per shard of
the pool's shard task and waits. Shard runs are created with a dynamic key made of the shard index and the
attempt, under the parent's flow run, so Prefect's own idempotency (one task run per flow run, task key and
dynamic key) turns a parent retry into a lookup of the runs it already made, never a duplicate. Shards are
committed by the workers straight to the output storage; the parent reads their markers and writes the
manifest.

Worker (`sdflow worker --pool NAME`): `prefect.task_worker.serve(shard task, limit=1)`: one process per GPU,
one shard at a time, the model loaded once and reused for every shard it serves. Task parameters (the
shard's rows) travel through Prefect's task-scheduling storage, which parent and workers must share: local
disk on one machine; `PREFECT_TASKS_SCHEDULING_DEFAULT_STORAGE_BLOCK` on a shared store across machines.

A worker that dies holding a shard leaves its task run RUNNING for good (Prefect does not redeliver a task a
worker acknowledged). Each shard run reports progress in a progress artifact that names its worker; the
parent compares that with the server's list of live task workers, marks the run Crashed when its worker is
gone, and creates the next attempt. Two attempts of one shard can at worst both generate it: the commit
protocol keeps exactly one.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, replace
from uuid import UUID, uuid4

import numpy as np
import pyarrow as pa
from prefect import flow, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterTaskRunId, TaskRunFilter, TaskRunFilterId
from prefect.concurrency.sync import concurrency
from prefect.context import FlowRunContext, serialize_context
from prefect.results import ResultStore, get_or_create_default_task_scheduling_storage
from prefect.states import Crashed, Scheduled
from prefect.task_worker import store_parameters
from prefect.utilities.asyncutils import run_coro_as_sync

from nodes.commit import marker_path, write_shard
from nodes.errors import ModelError, SdflowError
from nodes.ingest import Shard
from nodes.models import inspect_model, load_components, model_loads, resolve_device, resolve_dtype
from nodes.params import Row, RunConfig
from nodes.store import open_output

log = logging.getLogger("sdflow")

DEVICE_ENV = "SDFLOW_DEVICE"  # the device a worker generates on: cpu, cuda, cuda:N
MAX_ATTEMPTS = 3  # per shard; a shard lost more often than this stops the run
LOST_WITHOUT_REPORT_S = 120
DEVICE_LEASE_S = 60  # how long a dead worker's device slot stays taken  # a RUNNING shard run that never reported progress is presumed lost after this


def worker_id() -> str:
    """This process's name in the server's list of live task workers (Prefect's TaskWorker.client_id)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def device_limit_name(device) -> str:
    """The global concurrency limit that keeps two batches off one device of one machine."""
    return re.sub(r"[^a-z0-9-]+", "-", f"sdflow-device-{socket.gethostname()}-{device}".lower())


@dataclass(frozen=True)
class ShardRequest:
    """Everything a worker needs to generate and commit one shard; no credentials (workers use their own)."""

    out: str  # the output dataset, as the parent opened it
    model: str | None  # the model reference as given; each worker resolves it
    fingerprint: str  # the parent's model fingerprint: a worker with a different model refuses the shard
    dtype: str | None  # as asked; None: the worker's device default
    run: RunConfig  # storage options emptied
    shard: Shard
    rows: list[Row]
    carried: pa.Table  # input columns carried through to the output
    keys: np.ndarray  # row keys, uint64


def status_line(worker: str, device, done: int, total: int, seconds: float) -> str:
    """A shard run's progress report; the worker comes first: the parent reads it back."""
    rate = done / seconds if seconds > 0 else 0.0
    return f"{worker} | {device} | {done}/{total} rows | {rate:.2f} images/s"


def run_shard(request: ShardRequest) -> dict:
    """Worker side: generate one shard on this worker's device and commit it; returns its marker."""
    from flows.generate import generate_shard_images, shard_failures, software_versions, storage_options_from_env

    started = time.perf_counter()
    worker = worker_id()
    device = resolve_device(os.environ.get(DEVICE_ENV))
    total = len(request.rows)
    report = create_progress_artifact(0.0, description=status_line(worker, device, 0, total, 0.0))
    storage_options = storage_options_from_env()
    fs, root = open_output(request.out, storage_options)
    marker_file = marker_path(root, request.shard.index)
    if fs.exists(marker_file):  # committed by an earlier attempt
        import json

        return {**json.loads(fs.cat_file(marker_file)), "outcome": "already committed"}
    info = inspect_model(request.model, storage_options)
    if info.fingerprint != request.fingerprint:
        raise ModelError(
            f"model {info.ref} on worker {worker} is not the parent's (fingerprint {info.fingerprint} vs "
            f"{request.fingerprint}): every worker must see the same model files."
        )
    components = load_components(info, device, resolve_dtype(request.dtype, device))
    run = replace(request.run, storage_options=storage_options, progress=False)
    done = 0

    def on_batch(batch: list[Row]) -> None:
        nonlocal done
        done += len(batch)
        seconds = time.perf_counter() - started
        update_progress_artifact(report, 100.0 * done / total, status_line(worker, device, done, total, seconds))

    def device_slot():
        if device.type == "cpu":  # CPU workers share cores, not a device: each runs on its own threads
            return nullcontext()
        # The lease is renewed while a batch runs; a worker that dies holding it frees the slot when it lapses.
        return concurrency(device_limit_name(device), occupy=1, strict=False, lease_duration=DEVICE_LEASE_S)

    pngs, failed = generate_shard_images(components, request.rows, run, deque(), on_batch, device_slot)
    seconds = time.perf_counter() - started
    extra = {
        "batch_size": run.batch_size,
        "versions": software_versions(),
        "device": str(device),
        "worker": worker,
        "model_loads": model_loads(),
        "seconds": round(seconds, 3),
        "images_per_second": round(total / seconds, 3),
    }
    rows, keys = request.rows, request.keys
    return write_shard(
        fs, root, request.shard.index, rows, keys, [p.result() for p in pngs], request.carried, run.sampler,
        info.ref, shard_failures(rows, keys, failed), extra,
    )


def shard_task(pool: str):
    """The pool's shard task: the same code for every pool, a task key of its own (workers serve by key)."""
    slug = re.sub(r"[^A-Za-z0-9_]+", "_", pool)

    def generate_shard(request: ShardRequest) -> dict:
        return run_shard(request)

    generate_shard.__qualname__ = generate_shard.__name__ = f"generate_shard_{slug}"
    # retries=0: a shard that raises is an input or model problem (the run stops and says why); a lost
    # worker is handled by the parent, which makes a new attempt.
    return task(generate_shard, name=f"generate-shard-{pool}", retries=0)


def serve_shards(pool: str, device: str | None = None) -> None:
    """Worker side: serve the pool's shard task, one shard at a time, until interrupted."""
    from prefect.task_worker import serve

    if device:
        os.environ[DEVICE_ENV] = device
    device = resolve_device(os.environ.get(DEVICE_ENV))
    if device.type != "cpu":
        with get_client(sync_client=True) as client:
            try:
                client.create_global_concurrency_limit(_limit_create(device_limit_name(device)))
            except Exception:  # it exists (another worker on this machine made it)
                pass
    serve(shard_task(pool), limit=1)


def _limit_create(name: str):
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    return GlobalConcurrencyLimitCreate(name=name, limit=1)


@dataclass
class Attempt:
    shard: Shard
    number: int
    task_run_id: UUID
    request: ShardRequest
    since: float  # when the parent created or found it (monotonic)


async def _create_shard_run(shard_task_, flow_run_id: UUID, request: ShardRequest, number: int):
    """The task run of one attempt at one shard, created deferred (for a worker), or the one that exists."""
    store = await ResultStore(result_storage=await get_or_create_default_task_scheduling_storage()).aupdate_for_task(
        shard_task_
    )
    parameters_id = uuid4()
    await store_parameters(store, parameters_id, {"parameters": {"request": request}, "context": serialize_context()})
    state = Scheduled()
    state.state_details.deferred = True
    state.state_details.task_parameters_id = parameters_id
    async with get_client() as client:
        return await client.create_task_run(
            task=shard_task_,
            flow_run_id=flow_run_id,
            dynamic_key=f"{shard_digest(request.keys)}-attempt-{number}",
            name=f"shard-{request.shard.index:05d}-attempt-{number}",
            state=state,
            extra_tags=[f"shard-{request.shard.index:05d}"],
        )


def shard_digest(keys: np.ndarray) -> str:
    """A shard's identity for idempotency: its rows (their keys), not its index, which a re-plan may change."""
    import hashlib

    return hashlib.blake2b(np.ascontiguousarray(keys, dtype=np.uint64).tobytes(), digest_size=8).hexdigest()


def used_shard_indices(pool: str) -> int:
    """One past the highest shard index that this flow run's earlier attempts gave a shard run (0 if none).

    A retried parent plans again; numbering its new shards past these keeps them off the indices that
    shard runs still in flight from before will commit.
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return 0
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[context.flow_run.id])))
    indices = [int(m.group(1)) for r in runs if (m := re.fullmatch(r"shard-(\d+)-attempt-\d+", r.name or ""))]
    return max(indices, default=-1) + 1


def _live_workers(client, task_key: str) -> set[str]:
    response = client.request("POST", "/task_workers/filter", json={"task_worker_filter": {"task_keys": [task_key]}})
    response.raise_for_status()
    return {w["identifier"] for w in response.json()}


def _reporters(client, task_run_ids: list[UUID]) -> dict[UUID, str]:
    """task run -> the worker named in its latest progress report."""
    if not task_run_ids:
        return {}
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(task_run_id=ArtifactFilterTaskRunId(any_=task_run_ids))
    )
    return {a.task_run_id: str(a.description or "").split(" | ")[0] for a in artifacts if a.type == "progress"}


def fan_out(requests, pool: str, on_committed, poll_seconds: float = 1.0) -> None:
    """Parent side: run each ShardRequest of the iterable on the pool's workers; `on_committed(marker)` per shard.

    Keeps about two shards per live worker queued, so workers never wait and the parent never holds the
    whole table. Returns when every shard is committed; raises SdflowError when a shard fails (its error
    is the worker's) or is lost MAX_ATTEMPTS times.
    """
    shard_task_ = shard_task(pool)
    flow_run = FlowRunContext.get().flow_run
    requests = iter(requests)
    active: dict[UUID, Attempt] = {}
    exhausted = False
    warned_idle = False
    seen_live: set[str] = set()
    with get_client(sync_client=True) as client:
        while True:
            live = _live_workers(client, shard_task_.task_key)
            seen_live |= live
            while not exhausted and len(active) < max(2, 2 * len(live)):
                request = next(requests, None)
                if request is None:
                    exhausted = True
                    break
                _submit(active, shard_task_, flow_run.id, request, 1)
            if not active:
                return
            if not live and not warned_idle and time.monotonic() - min(a.since for a in active.values()) > 30:
                log.warning("no worker serves pool %r yet: start one with `sdflow worker --pool %s`", pool, pool)
                warned_idle = True
            runs = client.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=list(active))))
            running = [r.id for r in runs if r.state and r.state.is_running()]
            reporters = _reporters(client, running)
            # Read after the reports: a report names a worker that is live now, or one that is gone.
            now_live = _live_workers(client, shard_task_.task_key)
            gone = seen_live - now_live
            for missing in set(active) - {r.id for r in runs}:
                # A task worker deletes a run whose parameters it cannot read (a worker with another sdflow
                # version, say). Count it as a lost attempt: others may read it; if none can, the run stops.
                _retry(active, shard_task_, flow_run.id, active[missing], "a worker could not read its parameters")
            seen_live = now_live
            for run in runs:
                attempt = active[run.id]
                state = run.state
                if state is None:
                    continue
                if state.is_completed():
                    del active[run.id]
                    log.info("shard %d committed (attempt %d)", attempt.shard.index, attempt.number)
                    on_committed(attempt.shard)
                elif state.is_failed():
                    raise SdflowError(f"shard {attempt.shard.index} failed on its worker: {state.message}")
                elif state.is_crashed() or state.is_cancelled():
                    _retry(active, shard_task_, flow_run.id, attempt, f"its run ended {state.name}")
                elif state.is_running():
                    holder = reporters.get(run.id)
                    if holder is not None and holder not in now_live:
                        _lose(client, active, shard_task_, flow_run.id, attempt, f"worker {holder} is gone")
                    elif holder is None and time.monotonic() - attempt.since > LOST_WITHOUT_REPORT_S and not now_live:
                        _lose(client, active, shard_task_, flow_run.id, attempt, "no worker reported on it")
                elif gone:
                    # A worker takes its next shard off the queue while it runs one; a worker that dies takes
                    # that one with it, still SCHEDULED. Nobody can say which those are, so every shard not
                    # yet running gets a new attempt; the old one, marked Crashed, is never started.
                    _lose(client, active, shard_task_, flow_run.id, attempt, f"worker {', '.join(sorted(gone))} is gone")
            time.sleep(poll_seconds)


def _submit(active: dict, shard_task_, flow_run_id: UUID, request: ShardRequest, number: int) -> None:
    run = run_coro_as_sync(_create_shard_run(shard_task_, flow_run_id, request, number))
    active[run.id] = Attempt(request.shard, number, run.id, request, time.monotonic())


def _lose(client, active: dict, shard_task_, flow_run_id: UUID, attempt: Attempt, why: str) -> None:
    """Mark an attempt Crashed (so a worker that still holds it never starts it) and make the next one."""
    client.set_task_run_state(attempt.task_run_id, Crashed(message=why), force=True)
    _retry(active, shard_task_, flow_run_id, attempt, why)


def _retry(active: dict, shard_task_, flow_run_id: UUID, attempt: Attempt, why: str) -> None:
    del active[attempt.task_run_id]
    if attempt.number >= MAX_ATTEMPTS:
        raise SdflowError(f"shard {attempt.shard.index} was lost {attempt.number} times ({why}); stopping the run.")
    log.warning("shard %d lost (%s): attempt %d", attempt.shard.index, why, attempt.number + 1)
    _submit(active, shard_task_, flow_run_id, attempt.request, attempt.number + 1)


@flow(name="shard-worker")
def shard_worker(pool: str, device: str | None = None) -> None:
    """A worker started as a deployment run on a GPU work pool: serves the pool's shards until cancelled.

    The same as `sdflow worker --pool NAME`, for clusters where Prefect's work pools place processes on
    GPUs (a Kubernetes job with one `nvidia.com/gpu`, a Docker container with the NVIDIA runtime).
    """
    serve_shards(pool, device)
