"""The evaluation flow: score a generated dataset of the shapes domain against its prompts.

Reads OUT's committed shards one at a time and writes, beside them:
    OUT/evaluation/data/part-NNNNN.parquet  per data shard: image, id, image_index, prompt and the row's scores (a dataset too)
    OUT/evaluation/summary.json             accuracy per attribute for seen and held-out combinations, mean CLIP score
    OUT/evaluation/contact_sheet.png        the first rows' images with their prompts, framed green (all correct) or red
and publishes the summary as Prefect artifacts. Running it again rewrites all three.
"""

from __future__ import annotations

import json
import time

import pandas as pd
import pyarrow as pa
from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.artifacts import publish_contact_sheet
from nodes.dataset.commit import read_committed
from nodes.errors import SdflowError
from nodes.shapes.evaluate import ClipScorer, judge_rows, summarize, summary_markdown
from nodes.dataset.sheet import SHEET_ROWS, contact_sheet
from nodes.pipeline.components import inspect_model
from nodes.dataset.store import (
    decode_images,
    huggingface_metadata,
    open_output,
    parquet_bytes,
    read_dataset_file,
    storage_options_from_env,
    write_file,
)

EVALUATION = "evaluation"  # folder under OUT
CLIP_BATCH = 256  # images per CLIP forward pass


@task(name="score-shard", cache_policy=NO_CACHE, persist_result=False)
def score_shard_task(table: pa.Table, scorer: ClipScorer) -> pa.Table:
    """A data shard's image, id, image_index and prompt with the judge's columns and the CLIP score."""
    images = decode_images(table.column("image"))
    prompts = table.column("prompt").to_pylist()
    scores = judge_rows(images, prompts)
    scores["clip_score"] = [
        float(s) for start in range(0, len(images), CLIP_BATCH)
        for s in scorer(images[start:start + CLIP_BATCH], prompts[start:start + CLIP_BATCH])
    ]
    scored = table.select(["image", "id", "image_index", "prompt"])
    columns = pa.Table.from_pandas(scores, preserve_index=False)
    for name in columns.column_names:
        scored = scored.append_column(name, columns.column(name))
    return scored.replace_schema_metadata(huggingface_metadata(scored.schema))


@flow(name="evaluate-dataset")
def evaluate_dataset(out: str, model: str | None = None, sheet_rows: int = SHEET_ROWS) -> dict:
    """Score every committed image of the dataset at `out` with the judge and the CLIP of `model` (default: the
    embedded model); returns {"summary": [...], "rows": N, "out_of_domain": N, "seconds": S}."""
    started = time.time()
    if sheet_rows < 1:
        raise SdflowError(f"--sheet-rows must be at least 1, not {sheet_rows}.")
    storage_options = storage_options_from_env()
    fs, root = open_output(out, storage_options)
    markers = [m for m in read_committed(fs, root).shards if m["file"]]
    if not markers:
        raise SdflowError(f"{out} holds no generated images (no committed shards under {out}/_shards); run `sdflow generate` first.")
    info = inspect_model(model, storage_options)
    scorer = ClipScorer(info.source)

    frames, sheet = [], {"images": [], "captions": [], "marks": []}
    for marker in markers:
        scored = score_shard_task(read_dataset_file(fs, root, marker["file"], ["image", "id", "image_index", "prompt"]), scorer)
        write_file(fs, f"{root}/{EVALUATION}/{marker['file']}", parquet_bytes(scored))  # data/part-NNNNN.parquet
        frame = scored.drop_columns(["image"]).to_pandas()
        frames.append(frame)
        take = min(sheet_rows - len(sheet["images"]), scored.num_rows)
        sheet["images"] += decode_images(scored.column("image").slice(0, take))
        sheet["captions"] += list(frame["prompt"][:take])
        sheet["marks"] += [None if pd.isna(ok) else bool(ok) for ok in frame["all_ok"][:take]]  # <NA>: out of the domain

    scores = pd.concat(frames, ignore_index=True)
    summary = summarize(scores)
    result = {
        "summary": summary,
        "rows": int(len(scores)),
        "out_of_domain": int(scores["combination"].isna().sum()),
        "model": info.ref,
        "seconds": round(time.time() - started, 3),
    }
    write_file(fs, f"{root}/{EVALUATION}/summary.json", (json.dumps(result, indent=2) + "\n").encode())
    publish_contact_sheet(
        fs, f"{root}/{EVALUATION}/contact_sheet.png", contact_sheet(**sheet), "sdflow-evaluation-sheet",
        f"# Evaluation of {out}\n\n{summary_markdown(summary)}\nGreen frame: the judge read every attribute the prompt asks for.\n",
        f"the first {len(sheet['images'])} images framed by the judge's verdict, with the summary",
    )
    create_table_artifact(summary, key="sdflow-evaluation", description=f"judge accuracy and CLIP score, {len(scores)} rows of {out}")
    return result
