"""The embedded model follows its prompts: the judge's accuracy on prompts drawn apart from training.

tests/bench/bench_quality.py prints the same figures for every sampler and for guidance 1.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.evaluate import evaluate_dataset
from flows.generate import generate_dataset
from nodes.shapes.evaluate import held_out_pair_accuracy, summarize
from nodes.shapes.domain import prompt_rows

EVAL_SEED = 2026  # training draws its examples from derived seeds; these prompts come from another stream


def accuracy(out, **settings) -> dict:
    generate_dataset(batch_size=16, shard_size=512, out=str(out), **settings)
    evaluate_dataset(out=str(out))
    scores = pd.read_parquet(out / "evaluation" / "data").drop(columns=["image"])
    result = {row["split"]: row for row in summarize(scores)}["all"]
    result["held_out_pair"] = held_out_pair_accuracy(scores)
    result["held_out_rows"] = int((scores["combination"] == "held-out").sum())
    return result


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    rows = prompt_rows(160, EVAL_SEED, "all") + prompt_rows(80, EVAL_SEED, "held_out")
    path = tmp_path_factory.mktemp("quality") / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.fixture(scope="module")
def default(prefect_api, prompts, tmp_path_factory) -> dict:
    return accuracy(tmp_path_factory.mktemp("quality") / "default", prompts=prompts)


def test_default_settings_meet_the_targets(default):
    result = default
    assert result["held_out_rows"] >= 80
    assert result["colour"] >= 0.95 and result["shape"] >= 0.90 and result["position"] >= 0.90, result
    assert result["held_out_pair"] >= 0.80, result


@pytest.mark.slow
@pytest.mark.parametrize("scheduler,steps", [("ddim", 50), ("euler", 30), ("euler_a", 30), ("dpmpp_2m", 20), ("unipc", 20)])
def test_samplers_at_their_usual_steps_meet_the_targets(prefect_api, prompts, tmp_path, scheduler, steps):
    result = accuracy(tmp_path / scheduler, prompts=prompts, scheduler=scheduler, steps=steps)
    assert result["colour"] >= 0.95 and result["shape"] >= 0.90 and result["position"] >= 0.90, result
    assert result["held_out_pair"] >= 0.80, result


def test_guidance_is_what_makes_images_follow_prompts(default, prompts, tmp_path):
    unguided = accuracy(tmp_path / "unguided", prompts=prompts, guidance=1.0)
    assert unguided["all"] < default["all"] - 0.03, (default, unguided)
