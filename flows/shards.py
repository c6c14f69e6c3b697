"""Shards made in this process: the engine with each batch a Prefect task run, image encoding beside it, commits overlapped."""

from __future__ import annotations

import os
import socket
import time
from collections import deque

from tqdm.auto import tqdm

from prefect import task
from prefect.cache_policies import NO_CACHE

from nodes.dataset.commit import shard_failures, write_shard
from nodes.dataset.ingest import PromptPlan, iter_shard_rows
from nodes.dataset.manifest import package_version, software_versions
from nodes.dataset.store import batch_encoder, encode_images, model_fields
from nodes.errors import TASK_RETRIES
from nodes.params import GenerationDefaults, RunConfig
from nodes.pipeline.adapters import adapter_counts
from nodes.pipeline.batch import CURRENT_BATCH, RunProgress, Stages, batch_images, generate_shard_images
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


# Each batch is a task run, visible in Prefect by shard and batch (generate-batch-shard-00003-batch-02). Its
# stages run inside it as plain calls: a task run costs its three state events, and the server's work on them
# took ~7 % of a 2-core machine's time from the U-Net when every stage and each batch's image encoding were
# task runs of their own (measured side by side on 200 images: README, Measured). `--stage-tasks` asks for them
# anyway (STAGE_TASKS): each stage of each batch a task run nested in its batch's, for a per-stage timeline.
BATCH = batch_task(task(batch_images, name="generate-batch", cache_policy=NO_CACHE, persist_result=False))
STAGE_TASKS = Stages(*map(batch_task, (encode_prompts_task, prepare_latents_task, denoise_task, decode_latents_task)))


def stages(run: RunConfig) -> Stages:
    return STAGE_TASKS if run.stage_tasks else Stages()


def image_encoder(components, run: RunConfig):
    """The engine's `encode_images`: starts a batch's encoding in the run's image format (with its infotext) on the
    encoding threads, so that it overlaps the next batch; returns its concurrent.futures.Future."""
    release = package_version("sdflow")
    model = model_fields(components.info)
    embeddings = tuple((e.token, e.short_hash) for e in components.info.embeddings)  # for the infotext's TI hashes
    return lambda rows, images: batch_encoder().submit(
        encode_images, images, rows, run.sampler, model, release, run.image, embeddings
    )


def write_encoded_shard(fs, root: str, index: int, rows, keys, encoded: list, *args) -> dict:
    """write_shard once its batches' image encodings (futures) are done: the commit waits for them, the engine does not."""
    return write_shard(fs, root, index, rows, keys, [e.result() for e in encoded], *args)


WRITE_SHARD = task(
    write_encoded_shard, name="write-shard", task_run_name="write-shard-{index:05d}", cache_policy=NO_CACHE,
    persist_result=False, **TASK_RETRIES,
)


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
    return {"batch_size": run.batch_size, "versions": software_versions(), "device": str(device), "run": run.run_id}


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
            components, rows, run, encode_images, encoding, lambda batch, failed: bar.update(len(batch)), stages=stages(run),
            progress=progress, shard=shard.index, run_batch=BATCH,
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
