"""The manifest: a dataset's record of what was asked and resolved, with which software, which shards hold it, what failed."""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version

import fsspec
import numpy as np

from nodes.dataset.commit import Committed
from nodes.dataset.ingest import PromptPlan
from nodes.dataset.store import DATASET_FORMAT, write_file
from nodes.params import GenerationDefaults, ImageFormat
from nodes.pipeline.components import ModelInfo

MANIFEST = "manifest.json"  # under OUT, written last


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def software_versions() -> dict:
    return {
        "python": platform.python_version(),
        **{p: package_version(p) for p in ("sdflow", "torch", "diffusers", "transformers", "prefect", "pyarrow")},
    }


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
    image: ImageFormat = ImageFormat(),
    adapters: dict | None = None,
    by_other_runs: int = 0,
) -> dict:
    """The dataset's record after a run: `committed` is every shard in OUT, `written` those this run committed,
    `by_other_runs` the images of its plan that another run committed first.

    Its size grows with the shards (~60 bytes each: 2.4 MB at ten million rows in shards of 256) and the rows
    that failed and were not generated since, never with the rows.
    """
    failed_keys = np.array([int(f["key"], 16) for f in committed.failed], dtype=np.uint64)
    failed = [f for f, done in zip(committed.failed, committed.holds(failed_keys)) if not done]
    return {
        "format": DATASET_FORMAT,
        "parameters": parameters,
        "resolved": {
            "steps": defaults.steps,
            "guidance_scale": defaults.guidance_scale,
            "width": defaults.width,
            "height": defaults.height,
            "negative_prompt": defaults.negative_prompt,
            "seed": defaults.seed,
            "guidance_rescale": defaults.guidance_rescale,
            "clip_skip": defaults.clip_skip,
            "images_per_prompt": defaults.images,  # rows without an `images` value make this many
            "model": info.ref,
            "family": info.family,
            "vae": info.vae,
            "checkpoint": info.checkpoint,  # a single-file checkpoint; "model" is then as given, its configs in checkpoint_config
            "checkpoint_config": info.source if info.checkpoint else None,
            "embeddings": [e.record() for e in info.embeddings],
            "model_fingerprint": info.fingerprint,
            "model_hash": info.model_hash,  # the infotext's: a single file's sha256, 10 hex digits (A1111's, Civitai's)
            "device": device,
            "dtype": dtype,
            "image_format": image.name,
            "image_quality": image.quality,  # None: lossless (PNG, WebP without a quality)
            "image_lossless": image.lossless,
            # --lora, for every row: each file's name, content and weight (rows' own sets are in their `loras` column)
            "loras": [{"name": x.name, "sha256": x.sha256, "weight": x.weight} for x in defaults.loras or ()],
        },
        "versions": software_versions(),
        # Counts of output rows (one per image) except `table` and `invalid`, which count the prompt table's rows.
        "rows": {
            "table": plan.num_rows,
            "images": plan.already_done + plan.rows_to_generate,  # what the table's valid rows make, done or to do
            "in_dataset": committed.rows,
            "generated": sum(m["rows"] for m in written),
            "by_other_runs": by_other_runs,  # made here too, but another run writing the same rows committed them first
            "already_done": plan.already_done,
            "invalid": len(plan.invalid),
            "failed": len(failed),
            "stale": plan.stale,
        },
        "invalid_rows": [
            {"position": position, "id": row_id, "problem": problem}
            for position, (row_id, problem) in sorted(plan.invalid.items())
        ],
        "failed_rows": failed,
        "shards": [s for s in committed.shards if s["file"]],
        "shards_written": sorted(m["shard"] for m in written if m["file"]),  # this run's, of those above
        "timings": timings,
        # The LoRA files the run named (name, path, sha256), and how many adapter loads and set switches it took.
        "adapters": adapters or {"loras": [], "loads": 0, "switches": 0},
    }


def write_manifest(fs: fsspec.AbstractFileSystem, root: str, manifest: dict) -> None:
    write_file(fs, f"{root}/{MANIFEST}", (json.dumps(manifest, indent=2, default=str) + "\n").encode(), "manifest")
