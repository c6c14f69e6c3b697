"""The worker side of a pool run: the shard task, serving it on one device, and the shard-worker flow.

`sdflow worker --pool NAME` is `prefect.task_worker.serve(shard task, limit=1)`: one process per GPU, one shard
at a time, the model loaded once and reused for every shard it serves. Task parameters (the shard's rows)
travel through Prefect's task-scheduling storage, which parent and workers must share: local disk on one
machine; `PREFECT_TASKS_SCHEDULING_DEFAULT_STORAGE_BLOCK` on a shared store across machines. Each worker serves
a task key of its own (see flows.fanout), and commits its shards straight to the output storage.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
from prefect import flow, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

from flows.artifacts import status_line
from flows.shards import BATCH, image_encoder, marker_extra, shard_stats, stages, worker_id, write_encoded_shard
from nodes.dataset.commit import read_marker, shard_failures
from nodes.dataset.ingest import Shard
from nodes.dataset.store import open_output, storage_options_from_env
from nodes.errors import ModelError
from nodes.params import Row, RunConfig
from nodes.pipeline.adapters import adapter_counts
from nodes.pipeline.batch import cpu_lanes, generate_shard_images
from nodes.pipeline.components import inspect_model, load_components, resolve_device, resolve_dtype
from nodes.pipeline.embeddings import with_embeddings

POOL_PREFIX = "generate_shard__"  # task keys: generate_shard__POOL__WORKER-codehash
DEVICE_ENV = "SDFLOW_DEVICE"  # the device a worker generates on: cpu, cuda, cuda:N
DEVICE_LEASE_S = 60  # how long a dead worker's device slot stays taken


def device_limit_name(device) -> str:
    """The global concurrency limit that keeps two batches off one device of one machine."""
    return re.sub(r"[^a-z0-9-]+", "-", f"sdflow-device-{socket.gethostname()}-{device}".lower())


@dataclass(frozen=True)
class ShardRequest:
    """Everything a worker needs to generate and commit one shard; no credentials (workers use their own)."""

    out: str  # the output dataset, as the parent opened it
    model: str | None  # the model reference as given; each worker resolves it
    fingerprint: str  # the parent's model fingerprint (its files' content): a worker with another model refuses the shard
    dtype: str | None  # as asked; None: the worker's device default
    run: RunConfig  # storage options emptied
    shard: Shard
    rows: list[Row]
    carried: pa.Table  # input columns carried through to the output
    keys: np.ndarray  # row keys, uint64
    vae: str | None = None  # a separate VAE as given (--vae); each worker resolves it
    prediction_type: str | None = None  # --prediction-type, for a single-file SD 2.x checkpoint
    checkpoint_config: str | None = None  # --model-config, a single-file checkpoint's configs
    embeddings: tuple[str, ...] = ()  # textual inversion as given (--embedding PATH[:TOKEN]); each worker reads them
    allow_pickle: bool = False  # --allow-pickle: pickle model checkpoints and embeddings may load


def run_shard(request: ShardRequest) -> dict:
    """Worker side: generate one shard on this worker's device and commit it; returns its marker."""
    started, adapters = time.perf_counter(), adapter_counts()
    worker = worker_id()
    device = resolve_device(os.environ.get(DEVICE_ENV))
    total = len(request.rows)
    report = create_progress_artifact(0.0, description=status_line(worker, device, 0, total, 0.0))
    storage_options = storage_options_from_env()
    fs, root = open_output(request.out, storage_options)
    committed = read_marker(fs, root, request.shard.index)
    # By an earlier attempt at these rows: nothing to generate. (Another run's rows at this index are not ours:
    # the commit then moves this shard to a free index.)
    if committed is not None and sorted(committed["keys"] + [f["key"] for f in committed["failed"]]) == sorted(
        f"{int(k):016x}" for k in request.keys
    ):
        return {**committed, "outcome": "already committed"}
    info = with_embeddings(
        inspect_model(request.model, storage_options, request.vae, request.prediction_type, request.checkpoint_config, request.allow_pickle),
        request.embeddings, request.allow_pickle,
    )
    if info.fingerprint != request.fingerprint:
        raise ModelError(
            f"model {info.ref} on worker {worker} is not the parent's (content fingerprint {info.fingerprint} vs "
            f"{request.fingerprint}): every worker must see the same model files, byte for byte."
        )
    components = load_components(info, device, resolve_dtype(request.dtype, device), request.allow_pickle)
    run = replace(request.run, storage_options=storage_options, progress=False, lanes=cpu_lanes(device))
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

    encoded, failed = generate_shard_images(
        components, request.rows, run, image_encoder(components, run), deque(), on_batch, device_slot, stages(run),
        shard=request.shard.index, run_batch=BATCH,
    )
    extra = {**marker_extra(run, device), **shard_stats(started, total, adapters)}
    rows, keys = request.rows, request.keys
    return write_encoded_shard(
        fs, root, request.shard.index, rows, keys, encoded, request.carried, run.sampler, info.ref,
        shard_failures(rows, keys, failed), extra,
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


def serve_shards(pool: str, device: str | None = None, model: str | None = None) -> None:
    """Worker side: serve the pool's shards, one at a time, until interrupted.

    With `model`, load it before the first shard arrives (a shard for another model loads that one, once).
    """
    from prefect.task_worker import serve

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


@flow(name="shard-worker")
def shard_worker(pool: str, device: str | None = None, model: str | None = None) -> None:
    """A worker started as a deployment run on a GPU work pool: serves the pool's shards until cancelled.

    The same as `sdflow worker --pool NAME`, for clusters where Prefect's work pools place processes on
    GPUs (a Kubernetes job with one `nvidia.com/gpu`, a Docker container with the NVIDIA runtime).
    """
    serve_shards(pool, device, model)
