"""The generation flow: a Parquet prompt table in, an image dataset out, stage by stage as Prefect tasks."""

from __future__ import annotations

import base64
import json
import logging
import os
import platform
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import replace
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

import torch
from prefect import flow
from PIL import Image
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from tqdm.auto import tqdm

from flows.fanout import ShardRequest, fan_out, used_shard_indices
from nodes.decode import decode_latents_task
from nodes.denoise import denoise_task, make_scheduler, scheduler_name
from nodes.encode import encode_prompts_task
from nodes.errors import SdflowError
from nodes.sheet import contact_sheet, png_bytes
from nodes.commit import Committed, clean_uncommitted, read_committed, read_marker, write_shard_task
from nodes.ingest import PromptPlan, iter_shard_rows, make_batches, plan_prompt_table_task, resolve_defaults
from nodes.latents import make_generators, prepare_latents_task
from nodes.models import ModelInfo, inspect_model, load_components_task, resolve_device, resolve_dtype
from nodes.params import GenerationDefaults, Row, RunConfig
from nodes.store import decode_images, encode_pngs_task, open_output, read_dataset_file, write_file, write_manifest

log = logging.getLogger("sdflow")

STORAGE_OPTIONS_ENV = "SDFLOW_STORAGE_OPTIONS"  # JSON fsspec options; kept out of flow parameters (secrets)
SHEET_ROWS = 32  # images on a contact sheet: the dataset's first rows
CONTACT_SHEET = "contact_sheet.png"  # under OUT


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def storage_options_from_env() -> dict:
    """fsspec storage options from SDFLOW_STORAGE_OPTIONS; credentials never travel as flow parameters."""
    raw = os.environ.get(STORAGE_OPTIONS_ENV)
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SdflowError(f"{STORAGE_OPTIONS_ENV} (or --storage-options) is not valid JSON: {e}.") from None
    if not isinstance(options, dict):
        raise SdflowError(f"{STORAGE_OPTIONS_ENV} (or --storage-options) must be a JSON object.")
    return options


def build_manifest(
    parameters: dict,
    defaults: GenerationDefaults,
    info: ModelInfo,
    device: str,
    dtype: str,
    plan: PromptPlan,
    committed: Committed,
    written: list[dict],
    timings: dict,
) -> dict:
    """The dataset's record: what was asked and resolved, with which software, which shards hold it, what failed."""
    in_dataset = set(committed.keys.tolist())
    failed = {f["key"]: f for m in committed.markers for f in m["failed"] if int(f["key"], 16) not in in_dataset}
    return {
        "format": "sdflow-dataset/1",
        "parameters": parameters,
        "resolved": {
            "steps": defaults.steps,
            "guidance_scale": defaults.guidance_scale,
            "width": defaults.width,
            "height": defaults.height,
            "negative_prompt": defaults.negative_prompt,
            "seed": defaults.seed,
            "model": info.ref,
            "model_fingerprint": info.fingerprint,
            "device": device,
            "dtype": dtype,
        },
        "versions": software_versions(),
        "rows": {
            "table": plan.num_rows,
            "in_dataset": int(sum(m["rows"] for m in committed.markers)),
            "generated": sum(m["rows"] for m in written),
            "already_done": plan.already_done,
            "invalid": len(plan.invalid),
            "failed": len(failed),
            "stale": plan.stale,
        },
        "invalid_rows": [
            {"position": position, "id": row_id, "problem": problem}
            for position, (row_id, problem) in sorted(plan.invalid.items())
        ],
        "failed_rows": list(failed.values()),
        "shards": [{"shard": m["shard"], "file": m["file"], "rows": m["rows"]} for m in committed.markers if m["file"]],
        "timings": timings,
    }


def software_versions() -> dict:
    return {
        "python": platform.python_version(),
        **{p: package_version(p) for p in ("sdflow", "torch", "diffusers", "transformers", "prefect", "pyarrow")},
    }


def first_images(fs, root: str, markers, count: int) -> tuple[list[Image.Image], list[str]]:
    """The images and prompts of the dataset's first `count` rows (committed shards in index order)."""
    images, prompts = [], []
    for marker in markers:
        if len(images) >= count:
            break
        if marker["file"]:
            table = read_dataset_file(fs, root, marker["file"], ["image", "prompt"]).slice(0, count - len(images))
            images += decode_images(table.column("image"))
            prompts += table.column("prompt").to_pylist()
    return images, prompts


def publish_contact_sheet(fs, path: str, sheet: Image.Image, key: str, header: str) -> None:
    """Write the contact sheet to `path` and publish it, embedded, in a markdown artifact under `header`."""
    data = png_bytes(sheet)
    write_file(fs, path, data)
    embedded = base64.b64encode(data).decode()
    markdown = f"{header}\n![contact sheet](data:image/png;base64,{embedded})\n\nFull size: `{fs.unstrip_protocol(path)}`\n"
    create_markdown_artifact(markdown, key=key, description="contact sheet")


@flow(name="generate-dataset")
def generate_dataset(
    prompts: str,
    out: str,
    model: str | None = None,
    scheduler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    width: int | None = None,
    height: int | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 8,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    skip_invalid: bool = False,
    shard_size: int = 256,
    batches_in_flight: int = 2,
    allow_pickle: bool = False,
    pool: str | None = None,
    progress: bool = False,
) -> dict:
    """Generate one image per row of the Parquet table `prompts` into the dataset at `out`; returns the manifest.

    Options left as None take the model's own values. Storage credentials come from the AWS environment
    or SDFLOW_STORAGE_OPTIONS, never from parameters. With `pool`, shards run on the task workers serving
    that pool (`sdflow worker --pool NAME`), which write to `out` themselves; without, in this process.
    """
    parameters = {k: v for k, v in locals().items() if k != "progress"}
    if batch_size < 1 or shard_size < 1 or batches_in_flight < 1:
        raise SdflowError("--batch-size, --shard-size and batches in flight must be at least 1.")
    started = time.time()
    storage_options = storage_options_from_env()

    # Everything that can be wrong with the input is checked before a weight is loaded.
    info = inspect_model(model, storage_options)
    defaults = resolve_defaults(info, steps, guidance, width, height, negative_prompt, seed)
    sampler = scheduler_name(scheduler, info.scheduler_config)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    fs, root = open_output(out, storage_options)
    committed = read_committed(fs, root)
    first_shard = max(committed.next_index, used_shard_indices(pool) if pool else 0)
    plan = plan_prompt_table_task(
        prompts,
        defaults,
        info.size_multiple,
        shard_size,
        identity=(sampler, info.fingerprint),
        done_keys=committed.keys,
        first_shard=first_shard,
        skip_invalid=skip_invalid,
        storage_options=storage_options,
    )

    load_seconds = 0.0
    generation_started = time.time()
    run = RunConfig(scheduler, sampler, batch_size, batches_in_flight, progress, storage_options)
    report = ShardReport(plan, fs, root)
    if plan.shards and pool:
        requests = shard_requests(plan, defaults, info, run, out, model, dtype)
        fan_out(requests, pool, report.committed)
    elif plan.shards:
        components = load_components_task(info, torch_device, torch_dtype, allow_pickle)
        load_seconds = components.load_seconds
        generation_started = time.time()
        generate_shards(components, plan, defaults, run, fs, root, report.committed)
    report.publish()
    written = report.markers  # the markers this run committed

    finished = time.time()
    generated = sum(m["rows"] for m in written)
    timings = {
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "finished": datetime.fromtimestamp(finished, timezone.utc).isoformat(),
        "seconds": round(finished - started, 3),
        "model_load_seconds": round(load_seconds, 3),
        "generation_seconds": round(finished - generation_started, 3),
        "images_per_second": round(generated / max(finished - generation_started, 1e-9), 3),
    }
    committed = read_committed(fs, root)
    clean_uncommitted(fs, root, committed.files)
    manifest = build_manifest(
        parameters, defaults, info, str(torch_device), str(torch_dtype).removeprefix("torch."), plan, committed, written, timings
    )
    if committed.files:
        images, captions = first_images(fs, root, committed.markers, SHEET_ROWS)
        header = f"# {out}\n\n{manifest['rows']['in_dataset']} images; the first {len(images)}:\n"
        publish_contact_sheet(fs, f"{root}/{CONTACT_SHEET}", contact_sheet(images, captions), "sdflow-contact-sheet", header)
        manifest["contact_sheet"] = CONTACT_SHEET
    write_manifest(fs, root, manifest)
    return manifest


def generate_batch(components, scheduler: str | None, rows: list[Row], failed: dict[int, str]):
    """Run one batch through the stages; yields (rows, images) for the rows that came out.

    Out of memory halves the batch and tries again, down to one row. Any other error isolates the rows: each
    is tried again alone, from fresh generators seeded as before (so a retry never changes an image), and a
    row that still fails is recorded in `failed` (position -> error) and left out, so the rest of the run
    goes on. Input errors stop the run.
    """
    try:
        sched = make_scheduler(scheduler, components.info.scheduler_config, rows[0].steps, components.device)
        generators = make_generators(rows)
        embeds = encode_prompts_task(components, rows)
        latents = prepare_latents_task(components, rows, generators, sched.init_noise_sigma)
        latents = denoise_task(components, sched, latents, embeds, rows, generators)
        decoded = decode_latents_task(components, latents)
    except SdflowError:
        raise
    except Exception as e:
        if len(rows) == 1:
            failed[rows[0].position] = f"{type(e).__name__}: {e}"
            log.warning("row %r failed: %s", rows[0].id, failed[rows[0].position])
            return
        if isinstance(e, torch.OutOfMemoryError):
            half = len(rows) // 2
            log.warning("out of memory at batch size %d; trying %d and %d", len(rows), half, len(rows) - half)
            parts = [rows[:half], rows[half:]]
        else:
            parts = [[r] for r in rows]
        for part in parts:
            yield from generate_batch(components, scheduler, part, failed)
        return
    for i in decoded.non_finite:
        failed[rows[i].position] = "non-finite values after VAE decode, also in float32"
        log.warning("row %r failed: %s", rows[i].id, failed[rows[i].position])
    keep = [i for i in range(len(rows)) if i not in decoded.non_finite]
    if keep:
        yield [rows[i] for i in keep], decoded.images[keep]


def generate_shard_images(
    components, rows: list[Row], run: RunConfig, encoding: deque, on_batch=None, device_slot=nullcontext
) -> tuple[list, dict[int, str]]:
    """Generate one shard's rows batch by batch; returns its PNG futures (one per batch) and its failed rows.

    PNG encoding of a batch overlaps the next batch's denoising, with at most `run.batches_in_flight`
    batches waiting in `encoding` (shared across shards). `device_slot()` is held while a batch runs on the
    device (a per-device concurrency slot on GPU workers); `on_batch(rows, failed so far)` follows each batch.
    """
    info = components.info
    release = package_version("sdflow")
    pngs = []
    failed: dict[int, str] = {}
    for batch in make_batches(rows, run.batch_size):
        with device_slot():
            outputs = list(generate_batch(components, run.scheduler, batch, failed))
        for done, images in outputs:
            while len(encoding) >= run.batches_in_flight:
                encoding.popleft().wait()
            encoding.append(encode_pngs_task.submit(images, done, run.sampler, info.ref, release))
            pngs.append(encoding[-1])
        if on_batch:
            on_batch(batch, failed)
    return pngs, failed


def shard_failures(rows: list[Row], keys, failed: dict[int, str]) -> list[dict]:
    """The marker's record of rows that failed: key, id, position and error."""
    return [
        {"key": f"{int(k):016x}", "id": r.id, "position": r.position, "error": failed[r.position]}
        for r, k in zip(rows, keys)
        if r.position in failed
    ]


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
    bar = tqdm(total=plan.rows_to_generate, unit="img", disable=not run.progress, desc="generating")
    encoding = deque()
    writing = deque()
    for shard, rows, carried, keys in iter_shard_rows(plan, defaults, info.size_multiple, run.storage_options):
        pngs, failed = generate_shard_images(components, rows, run, encoding, on_batch=lambda batch, failed: bar.update(len(batch)))
        writing.append(
            write_shard_task.submit(
                fs, root, shard.index, rows, keys, pngs, carried, run.sampler, info.ref, shard_failures(rows, keys, failed), extra
            )
        )
        while len(writing) > 1:
            on_committed(writing.popleft().result())
    for w in writing:
        on_committed(w.result())
    bar.close()


def shard_requests(plan: PromptPlan, defaults: GenerationDefaults, info: ModelInfo, run: RunConfig, out: str, model, dtype):
    """The planned shards as requests for pool workers, streamed from the table (credentials left out)."""
    wire = replace(run, storage_options={}, progress=False)
    for shard, rows, carried, keys in iter_shard_rows(plan, defaults, info.size_multiple, run.storage_options):
        yield ShardRequest(out, model, info.fingerprint, dtype, wire, shard, rows, carried, keys)


class ShardReport:
    """The run's Prefect artifacts: a progress bar that advances as shards commit, then a table of shards."""

    def __init__(self, plan: PromptPlan, fs, root: str):
        self.total = len(plan.shards)
        self.fs, self.root = fs, root
        self.markers: list[dict] = []
        self.progress = create_progress_artifact(0.0, key="sdflow-shards", description=self._line()) if self.total else None

    def _line(self) -> str:
        rows = sum(m["rows"] for m in self.markers)
        return f"{len(self.markers)}/{self.total} shards committed, {rows} images"

    def committed(self, shard_or_marker) -> None:
        """Record a committed shard: a marker (in-process runs), or a Shard whose marker a worker wrote."""
        marker = shard_or_marker
        if not isinstance(marker, dict):
            marker = read_marker(self.fs, self.root, shard_or_marker.index)
        self.markers.append(marker)
        update_progress_artifact(self.progress, 100.0 * len(self.markers) / self.total, self._line())

    def publish(self) -> None:
        if not self.markers:
            return
        columns = ("shard", "rows", "failed", "device", "worker", "images_per_second", "seconds", "model_loads")
        table = [
            {c: (len(m["failed"]) if c == "failed" else m.get(c)) for c in columns}
            for m in sorted(self.markers, key=lambda m: m["shard"])
        ]
        create_table_artifact(table, key="sdflow-shard-table", description=f"{len(table)} shards committed by this run")
