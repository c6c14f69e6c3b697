"""Shards made in this process: the engine with each stage as a Prefect task, image encoding beside it, commits overlapped."""

from __future__ import annotations

import os
import socket
import time
from collections import deque

from tqdm.auto import tqdm

from nodes.dataset.commit import shard_failures, write_shard_task
from nodes.dataset.ingest import PromptPlan, iter_shard_rows
from nodes.dataset.manifest import package_version, software_versions
from nodes.dataset.store import encode_images_task, model_fields
from nodes.params import GenerationDefaults, RunConfig
from nodes.pipeline.adapters import adapter_counts
from nodes.pipeline.batch import CURRENT_BATCH, RunProgress, Stages, generate_shard_images
from nodes.pipeline.components import model_loads
from nodes.pipeline.decode import decode_latents_task
from nodes.pipeline.denoise import denoise_task
from nodes.pipeline.encode import encode_prompts_task
from nodes.pipeline.latents import prepare_latents_task


def batch_task(stage_task):
    """`stage_task` with each run named by the batch it works on (denoise-shard-00003-batch-02), not a random suffix."""

    def run_name() -> str:
        place = CURRENT_BATCH.get()
        if place is None or place.shard is None:
            return stage_task.name
        return f"{stage_task.name}-shard-{place.shard:05d}-batch-{place.batch:02d}"

    return stage_task.with_options(task_run_name=run_name)


# The engine's stages as task runs: each stage of each batch is visible in Prefect, by shard and batch.
TASK_STAGES = Stages(*map(batch_task, (encode_prompts_task, prepare_latents_task, denoise_task, decode_latents_task)))
ENCODE_IMAGES = batch_task(encode_images_task)
WRITE_SHARD = write_shard_task.with_options(task_run_name="write-shard-{index:05d}")


def image_encoder(components, run: RunConfig):
    """The engine's `encode_images`: submits a batch's encoding in the run's image format (with its infotext) as a
    task, in the thread pool, so that it overlaps the next batch; returns its future."""
    release = package_version("sdflow")
    model = model_fields(components.info)
    embeddings = tuple((e.token, e.short_hash) for e in components.info.embeddings)  # for the infotext's TI hashes
    return lambda rows, images: ENCODE_IMAGES.submit(images, rows, run.sampler, model, release, run.image, embeddings)


def worker_id() -> str:
    """This process's name: in the shard table, and in the server's list of live task workers (Prefect's TaskWorker.client_id)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def shard_stats(started: float, rows: int, adapters_before: dict) -> dict:
    """What the shard table shows of a shard made here: who made it, in how long, how fast, after how many loads;
    and the LoRA loads and switches it took (adapter_counts() from before it)."""
    seconds = time.perf_counter() - started
    adapters = adapter_counts()
    return {"worker": worker_id(), "model_loads": model_loads(), "seconds": round(seconds, 3),
            "images_per_second": round(rows / seconds, 3) if seconds > 0 else None,
            "adapter_loads": adapters["loads"] - adapters_before["loads"],
            "adapter_switches": adapters["switches"] - adapters_before["switches"]}


def marker_extra(run: RunConfig, device) -> dict:
    """What a shard's marker records about how it was made, beyond its rows."""
    return {"batch_size": run.batch_size, "versions": software_versions(), "device": str(device)}


def generate_shards(
    components, plan: PromptPlan, defaults: GenerationDefaults, run: RunConfig, fs, root: str, on_committed
) -> None:
    """Generate and commit the planned shards in this process; `on_committed(marker)` as each commits.

    One shard may be committing while the next is generated, so memory stays flat.
    """
    info = components.info
    extra = marker_extra(run, components.device)
    encode_images = image_encoder(components, run)
    bar = tqdm(total=plan.rows_to_generate, unit="img", disable=not run.progress, desc="generating")
    encoding = deque()
    writing = deque()
    progress = RunProgress()  # once a row has come out, rows failing alone are the rows' problem, in any shard
    for shard, rows, carried, keys in iter_shard_rows(plan, defaults, info.size_multiple, run.storage_options):
        started, adapters = time.perf_counter(), adapter_counts()
        encoded, failed = generate_shard_images(
            components, rows, run, encode_images, encoding, lambda batch, failed: bar.update(len(batch)), stages=TASK_STAGES,
            progress=progress, shard=shard.index,
        )
        failures = shard_failures(rows, keys, failed)
        stats = {**extra, **shard_stats(started, len(rows), adapters)}
        writing.append(
            WRITE_SHARD.submit(fs, root, shard.index, rows, keys, encoded, carried, run.sampler, info.ref, failures, stats)
        )
        while len(writing) > 1:
            on_committed(writing.popleft().result())
    for w in writing:
        on_committed(w.result())
    bar.close()
