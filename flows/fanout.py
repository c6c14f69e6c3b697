"""Fan-out: a run's shards go to long-lived Prefect task workers, one per GPU, that keep the model loaded.

Parent (the generation flow with `pool`): plans as usual, then creates one background task run per shard
and waits. Each worker serves a task key of its own, so the parent chooses who runs what: one shard
running and one next per live worker. Shard runs are created under the parent's flow run with a dynamic
key made of the shard's rows and the attempt, so Prefect's own idempotency (one task run per flow run,
task key and dynamic key) plus a lookup at start turn a parent retry into re-attachment, never a
duplicate. Workers commit their shards straight to the output storage; the parent reads the markers and
writes the manifest.

Worker (`sdflow worker --pool NAME`): `prefect.task_worker.serve(shard task, limit=1)`: one process per GPU,
one shard at a time, the model loaded once and reused for every shard it serves. Task parameters (the
shard's rows) travel through Prefect's task-scheduling storage, which parent and workers must share: local
disk on one machine; `PREFECT_TASKS_SCHEDULING_DEFAULT_STORAGE_BLOCK` on a shared store across machines.

A worker that dies leaves the task runs it took RUNNING or SCHEDULED for good (Prefect does not redeliver a
task a worker acknowledged). The parent compares the workers it gave shards to with the server's list of
live task workers; when one is gone it marks that worker's runs Crashed and gives the shards out again.
Two attempts of one shard can at worst both generate it: the commit protocol keeps exactly one.
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
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId
from prefect.concurrency.sync import concurrency
from prefect.context import FlowRunContext, serialize_context
from prefect.results import ResultStore, get_or_create_default_task_scheduling_storage
from prefect.states import Crashed, Scheduled
from prefect.task_worker import store_parameters
from prefect.utilities.asyncutils import run_coro_as_sync

from nodes.commit import read_marker, write_shard
from nodes.errors import ModelError, SdflowError
from nodes.ingest import Shard
from nodes.models import inspect_model, load_components, model_loads, resolve_device, resolve_dtype
from nodes.params import Row, RunConfig
from nodes.store import open_output

log = logging.getLogger("sdflow")

POOL_PREFIX = "generate_shard__"  # task keys: generate_shard__POOL__WORKER-codehash
SHARDS_PER_WORKER = 2  # one running, one taken off the queue to start next
DEVICE_ENV = "SDFLOW_DEVICE"  # the device a worker generates on: cpu, cuda, cuda:N
MAX_ATTEMPTS = 3  # per shard; a shard lost more often than this stops the run
DEVICE_LEASE_S = 60  # how long a dead worker's device slot stays taken


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


def status_line(worker: str, device, done: int, total: int, seconds: float, failed: int = 0) -> str:
    """A shard run's progress report: worker, device, rows done, failures, images per second."""
    rate = done / seconds if seconds > 0 else 0.0
    return f"{worker} | {device} | {done}/{total} rows | {failed} failed | {rate:.2f} images/s"


def run_shard(request: ShardRequest) -> dict:
    """Worker side: generate one shard on this worker's device and commit it; returns its marker."""
    from flows.generate import generate_shard_images, marker_extra, shard_failures, storage_options_from_env

    started = time.perf_counter()
    worker = worker_id()
    device = resolve_device(os.environ.get(DEVICE_ENV))
    total = len(request.rows)
    report = create_progress_artifact(0.0, description=status_line(worker, device, 0, total, 0.0))
    storage_options = storage_options_from_env()
    fs, root = open_output(request.out, storage_options)
    committed = read_marker(fs, root, request.shard.index)
    if committed is not None:  # by an earlier attempt: nothing to generate
        return {**committed, "outcome": "already committed"}
    info = inspect_model(request.model, storage_options)
    if info.fingerprint != request.fingerprint:
        raise ModelError(
            f"model {info.ref} on worker {worker} is not the parent's (fingerprint {info.fingerprint} vs "
            f"{request.fingerprint}): every worker must see the same model files."
        )
    components = load_components(info, device, resolve_dtype(request.dtype, device))
    run = replace(request.run, storage_options=storage_options, progress=False)
    done = 0

    def on_batch(batch: list[Row], failed: dict) -> None:
        nonlocal done
        done += len(batch)
        seconds = time.perf_counter() - started
        update_progress_artifact(report, 100.0 * done / total, status_line(worker, device, done, total, seconds, len(failed)))

    def device_slot():
        if device.type == "cpu":  # CPU workers share cores, not a device: each runs on its own threads
            return nullcontext()
        # The lease is renewed while a batch runs; a worker that dies holding it frees the slot when it lapses.
        return concurrency(device_limit_name(device), occupy=1, strict=False, lease_duration=DEVICE_LEASE_S)

    pngs, failed = generate_shard_images(components, request.rows, run, deque(), on_batch, device_slot)
    seconds = time.perf_counter() - started
    extra = {
        **marker_extra(run, device),
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text)


def shard_task(pool: str, worker: str):
    """One worker's shard task: the same code for every worker, a task key of its own.

    Workers serve by task key, and Prefect hands a queued run to whichever subscriber asks first, busy or
    not. A key per worker lets the parent choose: it gives each worker one shard to run and one to start
    next, so no worker idles while another holds two, and when a worker is gone the parent knows exactly
    which shards went with it.
    """

    def generate_shard(request: ShardRequest) -> dict:
        return run_shard(request)

    generate_shard.__qualname__ = generate_shard.__name__ = f"{POOL_PREFIX}{_slug(pool)}__{_slug(worker)}"
    # retries=0: a shard that raises is an input or model problem (the run stops and says why); a lost
    # worker is handled by the parent, which makes a new attempt.
    return task(generate_shard, name=f"generate-shard-{pool}", retries=0)


def pool_workers(client, pool: str) -> dict[str, str]:
    """Live workers of a pool: worker id -> its task key, from the server's list of task workers."""
    response = client.request("POST", "/task_workers/filter", json={"task_worker_filter": None})
    response.raise_for_status()
    prefix = f"{POOL_PREFIX}{_slug(pool)}__"
    return {
        w["identifier"]: key
        for w in response.json()
        for key in w["task_keys"]
        if key.startswith(prefix) and key[len(prefix):].startswith(_slug(w["identifier"]) + "-")
    }


def serve_shards(pool: str, device: str | None = None, model: str | None = None) -> None:
    """Worker side: serve the pool's shards, one at a time, until interrupted.

    With `model`, load it before the first shard arrives (a shard for another model loads that one, once).
    """
    from prefect.task_worker import serve

    from flows.generate import storage_options_from_env  # imported now, not when the first shard arrives

    if device:
        os.environ[DEVICE_ENV] = device
    torch_device = resolve_device(os.environ.get(DEVICE_ENV))
    if model:
        load_components(inspect_model(model, storage_options_from_env()), torch_device, resolve_dtype(None, torch_device))
    if torch_device.type != "cpu":
        with get_client(sync_client=True) as client:
            try:
                client.create_global_concurrency_limit(_limit_create(device_limit_name(torch_device)))
            except Exception:  # it exists (another worker on this machine made it)
                pass
    serve(shard_task(pool, worker_id()), limit=1)


def _limit_create(name: str):
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    return GlobalConcurrencyLimitCreate(name=name, limit=1)


@dataclass
class Attempt:
    shard: Shard
    number: int
    task_run_id: UUID
    request: ShardRequest
    worker: str  # the worker it was given to


def shard_digest(keys: np.ndarray) -> str:
    """A shard's identity for idempotency: its rows (their keys), not its index, which a re-plan may change."""
    import hashlib

    return hashlib.blake2b(np.ascontiguousarray(keys, dtype=np.uint64).tobytes(), digest_size=8).hexdigest()


def _shard_runs(client, flow_run_id: UUID) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [r for r in runs if re.fullmatch(r"shard-\d+-attempt-\d+", r.name or "")]


def used_shard_indices(pool: str) -> int:
    """One past the highest shard index that this flow run's earlier attempts gave a shard run (0 if none).

    A retried parent plans again; numbering its new shards past these keeps them off the indices that
    shard runs still in flight from before will commit.
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return 0
    with get_client(sync_client=True) as client:
        runs = _shard_runs(client, context.flow_run.id)
    return max((int(r.name.split("-")[1]) for r in runs), default=-1) + 1


async def _create_shard_run(shard_task_, flow_run_id: UUID, request: ShardRequest, number: int):
    """The task run of one attempt at one shard, created deferred, for the worker that serves `shard_task_`."""
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
            extra_tags=[f"rows-{shard_digest(request.keys)}"],
        )


class FanOut:
    """Parent side: hands shards to a pool's workers, watches them, and makes new attempts at lost ones."""

    def __init__(self, pool: str, client, flow_run_id: UUID):
        self.pool, self.client, self.flow_run_id = pool, client, flow_run_id
        self.active: dict[UUID, Attempt] = {}
        self.waiting: deque[tuple[ShardRequest, int]] = deque()  # (request, attempt number) to give out
        # A retried parent finds the runs its earlier attempts made: shard rows -> (attempt, run, worker key).
        self.earlier: dict[str, tuple[int, object]] = {}
        for run in _shard_runs(client, flow_run_id):
            digest = next((t[5:] for t in run.tags if t.startswith("rows-")), None)
            number = int(run.name.rsplit("-", 1)[1])
            if digest and number > self.earlier.get(digest, (0, None))[0]:
                self.earlier[digest] = (number, run)

    def give(self, request: ShardRequest, number: int, workers: dict[str, str]) -> bool:
        """Create the attempt on the least busy live worker (or re-attach to a retried parent's own run)."""
        earlier = self.earlier.pop(shard_digest(request.keys), None)
        if earlier and number == 1:
            number, run = earlier
            holder = next((w for w, key in workers.items() if key == run.task_key), None)
            if run.state and not (run.state.is_crashed() or run.state.is_cancelled()) and (holder or run.state.is_completed()):
                self.active[run.id] = Attempt(request.shard, number, run.id, request, holder or "")
                return True
            number += 1
        load = {w: 0 for w in workers}
        for attempt in self.active.values():
            if attempt.worker in load:
                load[attempt.worker] += 1
        free = [w for w, n in sorted(load.items(), key=lambda item: item[1]) if n < SHARDS_PER_WORKER]
        if not free:
            self.waiting.appendleft((request, number))
            return False
        worker = free[0]
        if number > MAX_ATTEMPTS:
            raise SdflowError(f"shard {request.shard.index} was lost {MAX_ATTEMPTS} times; stopping the run.")
        task_ = shard_task(self.pool, worker)
        run = run_coro_as_sync(_create_shard_run(task_, self.flow_run_id, request, number))
        self.active[run.id] = Attempt(request.shard, number, run.id, request, worker)
        return True

    def lose(self, attempt: Attempt, why: str) -> None:
        """Mark an attempt Crashed (a worker that still holds it never starts it); its shard waits for another."""
        del self.active[attempt.task_run_id]
        self.client.set_task_run_state(attempt.task_run_id, Crashed(message=why), force=True)
        log.warning("shard %d lost (%s); attempt %d will follow", attempt.shard.index, why, attempt.number + 1)
        if attempt.number >= MAX_ATTEMPTS:
            raise SdflowError(f"shard {attempt.shard.index} was lost {attempt.number} times ({why}); stopping the run.")
        self.waiting.append((attempt.request, attempt.number + 1))


def fan_out(requests, pool: str, on_committed, poll_seconds: float = 0.5) -> None:
    """Parent side: run each ShardRequest of the iterable on the pool's workers; `on_committed(shard)` per shard.

    Each live worker holds at most SHARDS_PER_WORKER shards; the rest of the table waits in the parent's
    iterator, never all in memory. Returns when every shard is committed; raises SdflowError when a shard
    fails (its error is the worker's) or is lost MAX_ATTEMPTS times.
    """
    flow_run = FlowRunContext.get().flow_run
    requests = iter(requests)
    exhausted = False
    idle_since = time.monotonic()
    with get_client(sync_client=True) as client:
        fan = FanOut(pool, client, flow_run.id)
        while True:
            workers = pool_workers(client, pool)
            for attempt in [a for a in fan.active.values() if a.worker and a.worker not in workers]:
                fan.lose(attempt, f"worker {attempt.worker} is gone")
            while workers:
                if fan.waiting:
                    if not fan.give(*fan.waiting.popleft(), workers):
                        break
                elif not exhausted:
                    request = next(requests, None)
                    if request is None:
                        exhausted = True
                    elif not fan.give(request, 1, workers):
                        break
                else:
                    break
            if not fan.active and not fan.waiting and exhausted:
                return
            if workers:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > 30:
                log.warning("no worker serves pool %r: start one with `sdflow worker --pool %s`", pool, pool)
                idle_since = time.monotonic()
            if fan.active:
                runs = {r.id: r for r in client.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=list(fan.active))))}
                for run_id, attempt in list(fan.active.items()):
                    run = runs.get(run_id)
                    state = run.state if run else None
                    if run is None:
                        # A task worker deletes a run whose parameters it cannot read (a worker with another
                        # sdflow version, say): a lost attempt; another worker may read it.
                        fan.lose(attempt, "its worker could not read its parameters")
                    elif state is None:
                        continue
                    elif state.is_completed():
                        del fan.active[run_id]
                        log.info("shard %d committed (attempt %d)", attempt.shard.index, attempt.number)
                        on_committed(attempt.shard)
                    elif state.is_failed():
                        raise SdflowError(f"shard {attempt.shard.index} failed on its worker: {state.message}")
                    elif state.is_crashed() or state.is_cancelled():
                        fan.lose(attempt, f"its run ended {state.name}")
            time.sleep(poll_seconds)


@flow(name="shard-worker")
def shard_worker(pool: str, device: str | None = None, model: str | None = None) -> None:
    """A worker started as a deployment run on a GPU work pool: serves the pool's shards until cancelled.

    The same as `sdflow worker --pool NAME`, for clusters where Prefect's work pools place processes on
    GPUs (a Kubernetes job with one `nvidia.com/gpu`, a Docker container with the NVIDIA runtime).
    """
    serve_shards(pool, device, model)
