"""Every image equals diffusers' own StableDiffusionPipeline for that row alone, whatever its batch."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers import StableDiffusionPipeline

from nodes.params import SAMPLERS as SCHEDULERS, Row
from nodes.pipeline.components import inspect_model, load_components
from tests.support.reference import diffusers_image, diffusers_pipeline, generate, max_level_difference

# A mixed batch: per-row seeds, guidance above, at and below 1 (no guidance), negative prompts or none.
ROWS = [
    Row(0, "a", "a small red circle on the left", "", 11, 4, 7.5, 64, 64),
    Row(1, "b", "a large blue square at the top", "blurry", 22, 4, 1.0, 64, 64),
    Row(2, "c", "a photo of a green triangle", "red", 33, 4, 3.0, 64, 64),
    Row(3, "d", "a yellow star 🌟 in the centre", "", 44, 4, 0.5, 64, 64),
]


@pytest.fixture(scope="module")
def components(tiny_model):
    return load_components(inspect_model(tiny_model), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def reference(tiny_model):
    return diffusers_pipeline(StableDiffusionPipeline, tiny_model, safety_checker=None, requires_safety_checker=False)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_mixed_batch_matches_diffusers_row_by_row(components, reference, scheduler):
    reference.scheduler = diffusers.PNDMScheduler.from_config(components.info.scheduler_config)
    ours = generate(components, ROWS, scheduler)
    for i, row in enumerate(ROWS):
        assert max_level_difference(ours[i], diffusers_image(reference, row, scheduler)) <= 1, (scheduler, row.id)


def test_models_own_scheduler_is_the_default(components, reference):
    reference.scheduler = diffusers.PNDMScheduler.from_config(components.info.scheduler_config)
    ours = generate(components, ROWS[:2], None)
    for i, row in enumerate(ROWS[:2]):
        assert max_level_difference(ours[i], diffusers_image(reference, row, None)) <= 1


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m_karras"])
def test_a_row_alone_equals_the_row_in_a_batch(components, scheduler):
    batch = generate(components, ROWS, scheduler)
    for i, row in enumerate(ROWS):
        alone = generate(components, [row], scheduler)[0]
        assert max_level_difference(alone, batch[i]) <= 1, row.id
    # Reordered, and with other neighbours: still the same images.
    shuffled = generate(components, ROWS[::-1], scheduler)[::-1]
    assert max_level_difference(shuffled, batch) <= 1


def test_images_depend_on_seed_prompt_and_guidance(components):
    """The comparisons above would be empty if the images ignored their inputs."""
    base = ROWS[0]
    variants = [
        base,
        Row(0, "a", base.prompt, "", base.seed + 1, 4, 7.5, 64, 64),
        Row(0, "a", "a cat", "", base.seed, 4, 7.5, 64, 64),
        Row(0, "a", base.prompt, "", base.seed, 4, 1.0, 64, 64),
    ]
    images = [generate(components, [r], "euler_a")[0] for r in variants]
    for other in images[1:]:
        assert max_level_difference(images[0], other) > 8


def test_other_sizes_follow_the_vae_scale_factor(components, reference):
    row = Row(0, "w", "a wide red square", "", 5, 4, 7.5, 96, 48)
    ours = generate(components, [row], "euler")[0]
    assert ours.shape == (48, 96, 3)
    assert max_level_difference(ours, diffusers_image(reference, row, "euler")) <= 1


def test_batches_in_lanes_give_the_images_of_batches_one_by_one(components):
    """On a CPU the engine runs two batches at once (batch.cpu_lanes), each in a thread of its own on half of torch's
    threads: every image is the one the batches give one by one (within 1 level), they come back in order, each knows its place
    (CURRENT_BATCH, which names its task run), and torch's thread count is restored after the shard."""
    import threading
    from collections import deque
    from concurrent.futures import Future

    import numpy as np

    from nodes.params import RunConfig
    from nodes.pipeline.batch import CURRENT_BATCH, batch_images, generate_shard_images

    rows = [Row(i, f"r{i}", ROWS[i % 4].prompt, ROWS[i % 4].negative_prompt, 100 + i, 4, 7.5, 64, 64) for i in range(7)]
    threads_before = torch.get_num_threads()

    def shard(lanes: int):
        seen, order = [], []

        def run_batch(*args):
            seen.append((CURRENT_BATCH.get().batch, threading.current_thread().name, torch.get_num_threads()))
            return batch_images(*args)

        def encode(done, images):
            future = Future()
            future.set_result({r.slot: images[i].numpy().copy() for i, r in enumerate(done)})
            return future

        run = RunConfig(None, "ddim", 2, 2, False, {}, lanes=lanes)
        futures, failed = generate_shard_images(
            components, rows, run, encode, deque(), on_batch=lambda batch, _: order.append([r.id for r in batch]), shard=5,
            run_batch=run_batch,
        )
        assert not failed
        images = {slot: image for f in futures for slot, image in f.result().items()}
        return np.stack([images[r.slot] for r in rows]), order, seen

    alone, order_alone, seen_alone = shard(1)
    laned, order_laned, seen_laned = shard(2)
    assert max_level_difference(laned, alone) <= 1  # one thread per op sums in another order: a level at most
    assert order_laned == order_alone == [[f"r{i}" for i in range(j, min(j + 2, 7))] for j in range(0, 7, 2)]
    assert sorted(number for number, _, _ in seen_laned) == [0, 1, 2, 3]
    assert all(name.startswith("sdflow-lane") for _, name, _ in seen_laned), seen_laned
    assert {threads for _, _, threads in seen_laned} == {max(1, threads_before // 2)}
    assert all(name == threading.current_thread().name for _, name, _ in seen_alone)
    assert torch.get_num_threads() == threads_before


def test_a_batch_alone_runs_on_all_of_torchs_threads():
    """Lanes split torch's threads between batches running at once; a shard of one batch (a one-image run) has
    nothing to share them with and keeps them all, in the calling thread."""
    import threading

    from nodes.pipeline.batch import in_lanes, torch_threads

    seen = []

    def call(number, batch):
        seen.append((number, threading.current_thread().name, torch.get_num_threads()))
        return len(batch)

    with torch_threads(2):
        assert list(in_lanes([["row"]], 2, call)) == [(["row"], 1)]
    assert seen == [(0, threading.current_thread().name, 2)]


def test_half_precision_matches_diffusers_on_the_same_batch(tiny_model):
    """In bfloat16 sdflow's images are diffusers' pipeline's for the same batch within a level: there the modules
    keep diffusers' memory layout (NHWC convolutions, kept for float32 and float16, round differently in bfloat16:
    7 levels here)."""
    import numpy as np

    rows = [Row(i, f"h{i}", prompt, negative, 100 + i, 4, 7.5, 64, 64)
            for i, (prompt, negative) in enumerate([("a red circle", ""), ("a blue square at the top", "blurry")])]
    components = load_components(inspect_model(tiny_model), torch.device("cpu"), torch.bfloat16)
    ours = generate(components, rows, "ddim")
    pipe = diffusers_pipeline(
        StableDiffusionPipeline, tiny_model, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.bfloat16
    )
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    theirs = pipe(
        [r.prompt for r in rows],
        negative_prompt=[r.negative_prompt for r in rows],
        num_inference_steps=4,
        guidance_scale=7.5,
        generator=[torch.Generator("cpu").manual_seed(r.seed) for r in rows],
    ).images
    assert max_level_difference(ours, np.stack([np.asarray(image) for image in theirs])) <= 1
