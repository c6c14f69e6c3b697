"""The generation flow: a Parquet prompt table in, an image dataset out: check → plan → generate here or fan out → finalize."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import torch
from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_flow_run

from flows.artifacts import ShardReport, publish_contact_sheet
from flows.shards import generate_shards
from nodes.dataset.commit import Committed, clean_uncommitted, read_committed, write_index
from nodes.dataset.ingest import PromptPlan, committed_schema, plan_prompt_table_task, resolve_defaults
from nodes.dataset.manifest import build_manifest, write_manifest
from nodes.dataset.sheet import CONTACT_SHEET, SHEET_ROWS, contact_sheet, first_images
from nodes.dataset.store import check_format, open_output, storage_options_from_env
from nodes.errors import SdflowError
from nodes.params import GenerationDefaults, RunConfig, image_format, image_format_rule
from nodes.pipeline.adapters import forget_named, named_loras, preload_loras, run_loras
from nodes.pipeline.batch import cpu_lanes
from nodes.pipeline.components import ModelInfo, inspect_model, load_components_task, resolve_device, resolve_dtype
from nodes.pipeline.denoise import scheduler_name
from nodes.pipeline.embeddings import with_embeddings


@dataclass(frozen=True)
class Job:
    """A run's inputs, checked and resolved before any weight loads."""

    info: ModelInfo
    defaults: GenerationDefaults
    run: RunConfig
    device: torch.device
    dtype: torch.dtype
    fs: object  # fsspec filesystem of the output
    root: str  # the output's root path on it
    committed: Committed  # what the output already holds
    started: float = field(default_factory=time.time)  # epoch seconds; cleanup leaves newer files to concurrent runs


def check_inputs(p: dict) -> Job:
    """Everything that can be wrong with the options, the model or the output, found before a weight is loaded."""
    if p["batch_size"] < 1 or p["shard_size"] < 1 or p["batches_in_flight"] < 1:
        raise SdflowError("--batch-size, --shard-size and batches in flight must be at least 1.")
    image = image_format(p["image_format"], p["image_quality"])
    if image is None:
        raise SdflowError(image_format_rule(p["image_format"], p["image_quality"]))
    storage_options = storage_options_from_env()
    info = with_embeddings(
        inspect_model(p["model"], storage_options, p["vae"], p["prediction_type"], p["checkpoint_config"], p["allow_pickle"]),
        p["embeddings"], p["allow_pickle"],
    )
    defaults = resolve_defaults(
        info, p["steps"], p["guidance"], p["width"], p["height"], p["negative_prompt"], p["seed"], p["guidance_rescale"],
        p["clip_skip"], p["images_per_prompt"],
    )
    forget_named()  # the manifest lists the LoRA files this run names, from here on
    defaults = replace(defaults, loras=run_loras(p["loras"], p["lora_dir"]), lora_dir=p["lora_dir"])
    sampler = scheduler_name(p["scheduler"], info.scheduler_config)
    device = resolve_device(p["device"])
    dtype = resolve_dtype(p["dtype"], device)
    fs, root = open_output(p["out"], storage_options)
    check_format(fs, root, p["out"])  # a dataset this version would extend (reading an older one is fine)
    run = RunConfig(
        p["scheduler"], sampler, p["batch_size"], p["batches_in_flight"], p["progress"], storage_options, image, p["stage_tasks"],
        run_id=current_flow_run.id or uuid.uuid4().hex, lanes=1 if p["torch_compile"] else cpu_lanes(device),
    )
    return Job(info, defaults, run, device, dtype, fs, root, read_committed(fs, root))


def run_timings(started: float, generation_started: float, load_seconds: float, written: list[dict]) -> dict:
    finished = time.time()
    generated = sum(m["rows"] for m in written)
    return {
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "finished": datetime.fromtimestamp(finished, timezone.utc).isoformat(),
        "seconds": round(finished - started, 3),
        "model_load_seconds": round(load_seconds, 3),
        "generation_seconds": round(finished - generation_started, 3),
        "images_per_second": round(generated / max(finished - generation_started, 1e-9), 3),
    }


def adapter_record(written: list[dict], preloaded: int) -> dict:
    """The run's LoRA files (by content) and how often they were loaded and switched: here, and on pool workers."""
    return {
        "loras": named_loras(),
        "loads": preloaded + sum(m.get("adapter_loads", 0) for m in written),
        "switches": sum(m.get("adapter_switches", 0) for m in written),
    }


def finalize(
    job: Job, parameters: dict, plan: PromptPlan, written: list[dict], timings: dict, preloaded: int = 0, by_other_runs: int = 0
) -> dict:
    """Index the committed rows, clean what killed attempts left, then write the contact sheet and, last, the manifest."""
    committed = read_committed(job.fs, job.root)
    index = write_index(job.fs, job.root, committed)
    clean_uncommitted(job.fs, job.root, committed.files, job.started, index)
    dtype = str(job.dtype).removeprefix("torch.")
    manifest = build_manifest(
        parameters, job.defaults, job.info, str(job.device), dtype, plan, committed, written, timings, job.run.image,
        adapters=adapter_record(written, preloaded), by_other_runs=by_other_runs,
    )
    if committed.files:
        images, captions = first_images(job.fs, job.root, committed.shards, SHEET_ROWS)
        header = f"# {parameters['out']}\n\n{manifest['rows']['in_dataset']} images; the first {len(images)}:\n"
        sheet = contact_sheet(images, captions)
        description = f"the dataset's first {len(images)} images and their prompts"
        publish_contact_sheet(job.fs, f"{job.root}/{CONTACT_SHEET}", sheet, "sdflow-contact-sheet", header, description)
        manifest["contact_sheet"] = CONTACT_SHEET
    if index:
        manifest["index"] = index
    write_manifest(job.fs, job.root, manifest)
    return manifest


def summary(manifest: dict, out: str) -> str:
    """What a run did, in one line: the CLI's last words and the flow run's last log record."""
    rows, timings = manifest["rows"], manifest["timings"]
    text = (
        f"wrote {rows['generated']} images in {len(manifest['shards_written'])} shard(s) to {out} "
        f"in {timings['seconds']:.1f} s ({timings['images_per_second']:.2f} images/s while generating, "
        f"model loaded in {timings['model_load_seconds']:.1f} s)."
    )
    if rows["already_done"]:
        text += f" {rows['already_done']} row(s) were already done."
    if rows["by_other_runs"]:
        text += (
            f" {rows['by_other_runs']} image(s) this run made were committed first by another run writing the same"
            " rows to this output (the same images, by their keys): that run's are kept."
        )
    if rows["stale"]:
        text += (
            f" {rows['stale']} row(s) from earlier runs with other parameters or another model stay in the dataset"
            " beside the new ones (counted as stale in the manifest)."
        )
    if rows["invalid"]:
        text += f" {rows['invalid']} invalid row(s) were skipped: see {out}/manifest.json."
    if rows["failed"]:
        text += f" {rows['failed']} row(s) failed (see failed_rows in {out}/manifest.json); a rerun tries them again."
    return text


@flow(name="generate-dataset")
def generate_dataset(
    prompts: str,
    out: str,
    model: str | None = None,
    vae: str | None = None,
    checkpoint_config: str | None = None,
    prediction_type: str | None = None,
    embeddings: list[str] | None = None,
    scheduler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    guidance_rescale: float = 0.0,
    clip_skip: int = 0,
    width: int | None = None,
    height: int | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 8,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    skip_invalid: bool = False,
    loras: list[str] | None = None,
    lora_dir: str | None = None,
    shard_size: int = 256,
    batches_in_flight: int = 2,
    allow_pickle: bool = False,
    torch_compile: bool = False,
    stage_tasks: bool = False,
    pool: str | None = None,
    progress: bool = False,
    image_format: str = "png",
    image_quality: int | None = None,
    images_per_prompt: int = 1,
) -> dict:
    """Generate images of the rows of the Parquet table `prompts` into the dataset at `out`; returns the manifest.

    Each row makes its `images` column's count of images, else `images_per_prompt`, each an output row of its own.

    Options left as None take the model's own values. Storage credentials come from the AWS environment
    or SDFLOW_STORAGE_OPTIONS, never from parameters. `image_format` is png (lossless), webp or jpeg; `image_quality`
    (1 to 100) makes WebP lossy and sets JPEG's (default 95). `loras`: LoRA files for every row, each "PATH[:WEIGHT]"
    (or a name in `lora_dir`, where rows' `loras` and prompt tags find theirs by name). With `pool`, shards run on
    the task workers serving that pool (`sdflow worker --pool NAME`), which write to `out` themselves; without, in this process.
    `embeddings`: textual-inversion files as `PATH[:TOKEN]` (the token defaults to the file's stem).
    Each batch is a task run; `stage_tasks` makes each of its stages one too (a per-stage timeline in the UI, at
    about five times the events).
    """
    parameters = {k: v for k, v in locals().items() if k != "progress"}
    started = time.time()
    job = check_inputs({**parameters, "progress": progress})

    if pool:  # only a pool run needs Prefect's task-worker machinery (FastAPI among it: 0.4 s of imports)
        from flows.fanout import fan_out, shard_requests, used_shard_indices
    first_shard = max(job.committed.next_index, used_shard_indices(pool) if pool else 0)
    plan = plan_prompt_table_task(
        prompts, job.defaults, job.info.size_multiple, shard_size,
        identity=(job.run.sampler, job.info.fingerprint, job.run.image.key),  # the image format: "" for PNG (row_key)
        done_keys=job.committed.keys, first_shard=first_shard, skip_invalid=skip_invalid,
        storage_options=job.run.storage_options, dataset_schema=committed_schema(job.fs, job.root, job.committed.shards, out),
    )

    report = ShardReport(plan, job.fs, job.root, job.run.run_id)
    load_seconds, generation_started, preloaded = 0.0, time.time(), 0
    if plan.shards and pool:
        fan_out(shard_requests(plan, job.defaults, job.info, job.run, parameters), pool, report.committed)
    elif plan.shards:
        components = load_components_task(job.info, job.device, job.dtype, allow_pickle, torch_compile)
        load_seconds, generation_started = components.load_seconds, time.time()
        preloaded = preload_loras(components)  # a LoRA that does not fit the model stops the run before any image
        generate_shards(components, plan, job.defaults, job.run, job.fs, job.root, report.committed)
    report.publish()

    timings = run_timings(started, generation_started, load_seconds, report.written)
    manifest = finalize(job, parameters, plan, report.written, timings, preloaded, report.rows_by_others)
    get_run_logger().info(summary(manifest, out))
    return manifest
