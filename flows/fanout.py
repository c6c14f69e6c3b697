"""The parent side of a pool run: a run's shards go to long-lived Prefect task workers (flows.worker), one per GPU.

The generation flow with `pool` plans as usual, then creates one background task run per shard and waits.
Each worker serves a task key of its own, so the parent chooses who runs what: one shard running and one next
per live worker. Shard runs are created under the parent's flow run with a dynamic key made of the shard's
rows and the attempt, so Prefect's own idempotency (one task run per flow run, task key and dynamic key) plus
a lookup at start turn a parent retry into re-attachment, never a duplicate. Workers commit their shards
straight to the output storage; the parent reads the markers and writes the manifest.

A worker that dies leaves the task runs it took RUNNING or SCHEDULED for good (Prefect does not redeliver a
task a worker acknowledged). The parent compares the workers it gave shards to with the server's list of
live task workers; when one is gone it marks that worker's runs Crashed and gives the shards out again.
Two attempts of one shard can at worst both generate it: the commit protocol keeps exactly one.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from dataclasses import dataclass, replace
from uuid import UUID, uuid4

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId
from prefect.context import FlowRunContext, serialize_context
from prefect.results import ResultStore, get_or_create_default_task_scheduling_storage
from prefect.states import Crashed, Scheduled
from prefect.task_worker import store_parameters
from prefect.utilities.asyncutils import run_coro_as_sync

from flows.worker import POOL_PREFIX, ShardRequest, _slug, shard_task
from nodes.dataset.ingest import PromptPlan, Shard, iter_shard_rows, shard_digest  # a shard's identity: its rows
from nodes.errors import SdflowError
from nodes.params import GenerationDefaults, RunConfig
from nodes.pipeline.components import ModelInfo

log = logging.getLogger("sdflow")

SHARDS_PER_WORKER = 2  # one running, one taken off the queue to start next
MAX_ATTEMPTS = 3  # per shard; a shard lost more often than this stops the run


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


@dataclass
class Attempt:
    shard: Shard
    number: int
    task_run_id: UUID
    request: ShardRequest
    worker: str  # the worker it was given to


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


def shard_requests(plan: PromptPlan, defaults: GenerationDefaults, info: ModelInfo, run: RunConfig, p: dict):
    """The planned shards as requests for pool workers, streamed from the table (credentials left out); `p` holds
    the run's model options as given (each worker resolves them)."""
    wire = replace(run, storage_options={}, progress=False)
    model = {k: p[k] for k in ("vae", "prediction_type", "checkpoint_config", "allow_pickle")} | {"embeddings": tuple(p["embeddings"] or ())}
    for shard, rows, carried, keys in iter_shard_rows(plan, defaults, info.size_multiple, run.storage_options):
        yield ShardRequest(p["out"], p["model"], info.fingerprint, p["dtype"], wire, shard, rows, carried, keys, **model)
