"""LoRA: files in both formats people hold, for the run and per row, loaded once and switched between batches;
every image equals diffusers' own pipeline with load_lora_weights and set_adapters at the row's weights."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from nodes.params import Row
from nodes.pipeline import adapters
from nodes.pipeline.adapters import active_set, lora_file, use_loras, without_lora_tags
from nodes.pipeline.batch import make_batches
from nodes.pipeline.components import inspect_model, load_components
from nodes.pipeline.encode import batch_key
from nodes.shapes.builders import ToyModelConfig, save_toy_model
from tests.support.loras import lora_layers, save_kohya_lora, save_peft_lora
from tests.support.models import save_tiny_sdxl
from tests.support.reference import diffusers_image, generate, max_level_difference

SCHEDULER = "euler_a"


def sd_row(position, prompt, seed, loras=None, guidance=7.5, negative=""):
    return Row(position, f"r{position}", prompt, negative, seed, 4, guidance, 64, 64, loras=loras)


def xl_row(position, prompt, seed, loras=None, guidance=5.0, negative=""):
    return Row(
        position, f"r{position}", prompt, negative, seed, 4, guidance, 64, 64,
        original_size=(64, 64), crops_coords_top_left=(0, 0), target_size=(64, 64), loras=loras,
    )


class Family:
    """A tiny model of one family (its own copy: adapters stay off the session's shared components), its LoRAs in
    both formats, sdflow's components and diffusers' reference pipeline with the same LoRAs loaded."""

    def __init__(self, root, family):
        self.family = family
        if family == "sdxl":
            self.model = str(save_tiny_sdxl(root / "model", seed=3))
        else:
            self.model = str(root / "model")
            save_toy_model(self.model, ToyModelConfig(seed=2))
        self.files = {}
        for seed, name in ((11, "style"), (12, "subject")):
            layers = lora_layers(self.model, family, seed=seed)
            self.files[f"{name}-peft"] = save_peft_lora(root / "loras" / f"{name}-peft.safetensors", layers, family)
            self.files[f"{name}-kohya"] = save_kohya_lora(root / "loras" / f"{name}-kohya.safetensors", layers, family)
        self.components = load_components(inspect_model(self.model), torch.device("cpu"), torch.float32)
        pipeline = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
        options = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
        self.reference = pipeline.from_pretrained(self.model, use_safetensors=True, **options)
        self.reference.set_progress_bar_config(disable=True)
        for name, path in self.files.items():
            self.reference.load_lora_weights(str(path), adapter_name=name)
        self.row = xl_row if family == "sdxl" else sd_row

    def lora(self, name, weight):
        return lora_file(self.files[name], weight, "the test")

    def diffusers(self, row):
        """diffusers' image for the row alone: its LoRAs set at its weights (none: disabled), its tags out of its prompt."""
        names = {lora.sha256: name for name, path in self.files.items() for lora in [lora_file(path, 1.0, "")]}
        if row.loras:
            self.reference.enable_lora()
            self.reference.set_adapters([names[lora.sha256] for lora in row.loras], [lora.weight for lora in row.loras])
        else:
            self.reference.disable_lora()
        return diffusers_image(self.reference, replace(row, prompt=without_lora_tags(row.prompt)), SCHEDULER)


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def family(request, tmp_path_factory):
    return Family(tmp_path_factory.mktemp(f"lora-{request.param}"), request.param)


def engine(components, rows):
    """The rows through the engine as a shard runs them: batched by shape and LoRA set, the active set first."""
    images = {}
    for batch in make_batches(rows, 8, lambda r: batch_key(components, r), active_set(components)):
        for row, image in zip(batch, generate(components, batch, SCHEDULER)):
            images[row.position] = image
    return [images[r.position] for r in rows]


@pytest.mark.parametrize("form", ["peft", "kohya"])
def test_a_run_wide_lora_matches_diffusers_in_both_formats(family, form):
    row = family.row(0, "a small red circle on the left", 11, (family.lora(f"style-{form}", 0.8),), negative="blue")
    ours, bare = engine(family.components, [row, replace(row, position=1, loras=None)])
    assert max_level_difference(ours, family.diffusers(row)) <= 1, form
    assert max_level_difference(ours, bare) > 8  # the LoRA visibly changes the image


def test_three_sets_in_one_run_match_diffusers_and_alone_equals_batched(family):
    style, subject = family.lora("style-peft", 0.3), family.lora("subject-kohya", -0.9)
    sets = [(style,), None, tuple(sorted((replace(style, weight=0.6), subject), key=lambda x: x.sha256))]
    # The third row's prompt holds a tag, as A1111 prompts do: the encoder sees the prompt without it.
    prompts = ["a red shape on the left", "a blue shape", "a green shape <lora:subject-kohya:-0.9>"]
    rows = [family.row(i, prompts[i], 100 + i, sets[i]) for i in range(3)]
    before = adapters.adapter_counts()
    ours = engine(family.components, rows)
    assert adapters.adapter_counts()["switches"] - before["switches"] <= 3  # one per set at most
    for row, image in zip(rows, ours):
        assert max_level_difference(image, family.diffusers(row)) <= 1, row.id
    for row, image in zip(rows[::-1], ours[::-1]):
        assert max_level_difference(engine(family.components, [row])[0], image) <= 1, row.id


def test_a_lora_is_loaded_once_per_process(family):
    lora = family.lora("subject-peft", 0.5)
    use_loras(family.components, (lora,))
    loads = adapters.adapter_counts()["loads"]
    for weight in (0.1, 0.2):
        use_loras(family.components, (replace(lora, weight=weight),))
        use_loras(family.components, None)
    assert adapters.adapter_counts()["loads"] == loads
