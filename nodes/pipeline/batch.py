"""The engine: one batch of rows through the stages in order, and one shard's rows batch by batch.

The stage order lives here and only here: the generation flow, the pool worker and the parity tests all call
these functions. The stages are plain functions by default, and so is a batch. The flows pass a Prefect task
for the batch (`run_batch`: one task run per batch) and, when asked for a per-stage timeline (`--stage-tasks`),
the stages' tasks too (`Stages` of the `*_task` wrappers), without the engine importing Prefect.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from nodes.errors import RunError, SdflowError, exception_chain, name_ids
from nodes.params import Row, RunConfig, lora_set
from nodes.pipeline.adapters import active_set, use_loras
from nodes.pipeline.decode import decode_latents
from nodes.pipeline.denoise import denoise, make_scheduler
from nodes.pipeline.encode import batch_key, encode_prompts
from nodes.pipeline.latents import make_generators, prepare_latents

log = logging.getLogger("sdflow")


@dataclass
class RunProgress:
    """Shared by a run's shards: whether any row of the run has come out yet."""

    produced: bool = False


@dataclass(frozen=True)
class BatchPlace:
    """Which batch the engine is working on: for labelling its work (the flows name task runs by it)."""

    shard: int | None  # the shard's index, as the caller gave it
    batch: int  # the batch's number within the shard, from 0


# Set by generate_shard_images while a batch runs, in the thread that runs it (and so in the tasks it submits).
CURRENT_BATCH: ContextVar[BatchPlace | None] = ContextVar("sdflow_current_batch", default=None)


@dataclass(frozen=True)
class Stages:
    """The stage functions the engine calls, in this order."""

    encode_prompts: Callable = encode_prompts
    prepare_latents: Callable = prepare_latents
    denoise: Callable = denoise
    decode_latents: Callable = decode_latents


def generate_batch(components, scheduler: str | None, rows: list[Row], failed: dict[tuple[int, int], str], stages: Stages = Stages()):
    """Run one batch (rows of one size and step count) through the stages; yields (rows, images) for the rows that came out.

    Images are (B, H, W, 3) uint8 on the CPU. Out of memory halves the batch and tries again, down to one row.
    Any other error isolates the rows: each is tried again alone, from fresh generators seeded as before (so a
    retry never changes an image), and a row that still fails is recorded in `failed` (Row.slot -> error) and
    left out, so the rest of the run goes on (the caller reports it). Input errors stop the run.
    """
    use_loras(components, rows[0].loras)  # a batch shares its LoRA set (Row.shape_key); a no-op when it is active
    try:
        sched = make_scheduler(scheduler, components.info.scheduler_config, rows[0].steps, components.device)
        generators = make_generators(rows)
        embeds = stages.encode_prompts(components, rows)
        latents = stages.prepare_latents(components, rows, generators, sched.init_noise_sigma)
        latents = stages.denoise(components, sched, latents, embeds, rows, generators)
        decoded = stages.decode_latents(components, latents)
    except SdflowError:
        raise
    except Exception as e:
        if interrupt := interrupt_behind(e):
            raise interrupt  # a stop signal, not the rows: Prefect failed while handling it (e.g. "Task run is not set")
        if len(rows) == 1:
            failed[rows[0].slot] = f"{type(e).__name__}: {e}"
            return
        if isinstance(e, torch.OutOfMemoryError):
            half = len(rows) // 2
            log.warning("out of memory at batch size %d; trying %d and %d", len(rows), half, len(rows) - half)
            parts = [rows[:half], rows[half:]]
        else:
            parts = [[r] for r in rows]
        for part in parts:
            yield from generate_batch(components, scheduler, part, failed, stages)
        return
    for i in decoded.non_finite:
        failed[rows[i].slot] = "non-finite values after VAE decode, also in float32"
    keep = [i for i in range(len(rows)) if i not in decoded.non_finite]
    if keep:
        yield [rows[i] for i in keep], decoded.images[keep]


def batch_images(components, scheduler: str | None, rows: list[Row], stages: Stages = Stages()) -> tuple[list, dict]:
    """generate_batch as a function of its inputs (a task's shape): the (rows, images) that came out, and the rows
    that failed (Row.slot -> error)."""
    failed: dict[tuple[int, int], str] = {}
    return list(generate_batch(components, scheduler, rows, failed, stages)), failed


def check_not_the_runs_failure(tried: list[Row], failed: dict[tuple[int, int], str]) -> None:
    """Raise RunError when the rows tried so far (every one failed, none came out) failed with the same error type.

    Row isolation is for rows that fail among rows that succeed. When the first rows all fail the same way, the
    cause is the run's (the model, the device, the software): recording every row as failed would end the run
    with no images and exit code 0, so it stops here instead. Two rows at least, so a first batch of one bad row
    does not stop it.
    """
    errors = [failed[r.slot] for r in tried]
    kinds = {error.split(":", 1)[0] for error in errors}
    # Out of memory even alone is the rows' size, not the run's: those rows are recorded and the run goes on.
    if len(errors) < 2 or len(kinds) > 1 or kinds == {"OutOfMemoryError"}:
        return
    raise RunError(
        f"the first {len(errors)} rows tried all failed alone with {errors[0]} (rows {name_ids(r.id for r in tried)}), "
        "and none came out: this is the run's problem, not the rows' (the model, the device or the software cannot "
        "generate), so the run stops. Fix the cause and run again; a row that fails among rows that succeed is "
        "recorded in the manifest instead"
    )


def interrupt_behind(error: BaseException) -> BaseException | None:
    """The interrupt (KeyboardInterrupt, Prefect's TerminationSignal: a BaseException, not an Exception) that
    `error` was raised while handling, if any."""
    return next((e for e in exception_chain(error) if not isinstance(e, Exception)), None)


def make_batches(
    rows: list[Row], batch_size: int, key: Callable[[Row], tuple] = lambda r: r.shape_key, active: tuple = ()
) -> list[list[Row]]:
    """Group rows into batches of up to `batch_size` that share `key` (width, height, steps and LoRA set; the engine
    adds the prompts' chunk count, encode.batch_key).

    Groups of one LoRA set run one after another, the set `active` now first, then the others in a fixed order (so a
    shard costs one adapter switch per set, and the next shard starts where this one ended); otherwise first-seen.
    """
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    ordered = sorted(groups.values(), key=lambda group: (lora_set(group[0]) != active, lora_set(group[0])))  # stable
    return [group[i : i + batch_size] for group in ordered for i in range(0, len(group), batch_size)]


def cpu_lanes(device: torch.device) -> int:
    """How many batches to generate at once on `device`: two on a CPU with two threads or more, else one.

    On a CPU, two batches at once, each on half of torch's threads, made the U-Net 16 % faster than one batch on
    all of them (2 cores: 2.74 against 3.25 s for six calls at batch 16, median of 4; outputs identical): one
    thread per op scales better than two on ops this size. A GPU gains nothing from it.
    """
    return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 else 1


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run the block with `threads` torch intra-op threads (None: as they are), then restore the previous count."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def in_lanes(batches: list[list[Row]], lanes: int, call: Callable) -> Iterator[tuple[list[Row], object]]:
    """(batch, call(number, batch)) for each batch in order, up to `lanes` of them running at once in threads of
    their own (each in a copy of this context: Prefect's run context, CURRENT_BATCH), on 1/lanes of torch's threads."""
    lanes = min(lanes, len(batches))  # a batch alone (a one-batch run: SD 1.5 at 512 took 1.4 times as long) keeps every thread
    if lanes <= 1:
        for number, batch in enumerate(batches):
            yield batch, call(number, batch)
        return
    threads = max(1, torch.get_num_threads() // lanes)
    with ThreadPoolExecutor(lanes, thread_name_prefix="sdflow-lane") as pool, torch_threads(threads):
        running = deque()
        for number, batch in enumerate(batches):
            running.append((batch, pool.submit(contextvars.copy_context().run, call, number, batch)))
            if len(running) == lanes:
                done, future = running.popleft()
                yield done, future.result()
        while running:
            done, future = running.popleft()
            yield done, future.result()


def generate_shard_images(
    components,
    rows: list[Row],
    run: RunConfig,
    encode_images: Callable,
    encoding: deque,
    on_batch: Callable | None = None,
    device_slot: Callable = nullcontext,
    stages: Stages = Stages(),
    progress: RunProgress | None = None,
    shard: int | None = None,
    run_batch: Callable = batch_images,
) -> tuple[list, dict[tuple[int, int], str]]:
    """Generate one shard's rows batch by batch; returns its encoded-image futures (one per batch) and its failed rows.

    `encode_images(rows, images)` starts a batch's image encoding and returns a concurrent.futures.Future; that encoding overlaps the
    next batch's denoising, with at most `run.batches_in_flight` batches waiting in `encoding` (shared across
    shards), so memory stays bounded. `device_slot()` is held while a batch runs on the device (a per-device
    concurrency slot on GPU workers); `on_batch(rows, failed so far)` follows each batch. Until a row of the
    shard (or, given `progress` shared across shards, of the run) comes out, rows failing the same way stop the
    run (check_not_the_runs_failure). While a batch runs, CURRENT_BATCH says which: `shard` (the caller's index for
    these rows) and the batch's number. `run_batch` is batch_images or a task of it (the flows'), called with `stages`.
    """
    progress = progress or RunProgress()
    futures = []
    failed: dict[tuple[int, int], str] = {}
    tried: list[Row] | None = None if progress.produced else []  # the rows tried before any came out
    batches = make_batches(rows, run.batch_size, lambda r: batch_key(components, r), active_set(components))
    # Lanes share the model, so only batches of one LoRA set (its switch made here, before them) run at once.
    lanes = run.lanes if len({lora_set(b[0]) for b in batches}) == 1 else 1
    if lanes > 1:
        use_loras(components, batches[0][0].loras)

    def call(number: int, batch: list[Row]):
        place = CURRENT_BATCH.set(BatchPlace(shard, number))
        try:
            with device_slot():
                return run_batch(components, run.scheduler, batch, stages)
        finally:
            CURRENT_BATCH.reset(place)

    for batch, (outputs, failures) in in_lanes(batches, lanes, call):
        failed.update(failures)
        if tried is not None:
            tried += batch
            if outputs:
                tried, progress.produced = None, True
            else:
                check_not_the_runs_failure(tried, failed)
        for row in batch:
            if row.slot in failed:
                log.warning("row %r failed: %s", row.id, failed[row.slot])
        for done, images in outputs:
            while len(encoding) >= run.batches_in_flight:
                wait_futures([encoding.popleft()])
            encoding.append(encode_images(done, images))
            futures.append(encoding[-1])
        if on_batch:
            on_batch(batch, failed)
    return futures, failed
