"""Textual inversion (--embedding): every format people hold gives diffusers' image after its own load_textual_inversion,
on SD and SDXL; embeddings are part of the model's identity, and never leak into a run without them."""

from __future__ import annotations

import inspect

import hashlib
import io
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from flows.generate import generate_dataset
from nodes.dataset.store import image_parameters
from nodes.pipeline.components import inspect_model, load_components
from nodes.pipeline.embeddings import EmbeddingError, with_embeddings
from nodes.params import Row
from tests.support.models import save_tiny_sdxl
from tests.support.reference import diffusers_image, generate, max_level_difference
from tests.support.runs import assert_clean_failure, images_by_id, run_cli
from tests.support.tables import write_table

CPU = torch.device("cpu")


def vectors(seed: int, count: int, width: int) -> torch.Tensor:
    """Random vectors large enough to move the tiny model's image far beyond a level."""
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sd_embeddings(tmp_path_factory, tiny_model):
    """One embedding in each SD format, for the tiny model's 32-wide encoder: {format: (file, token diffusers is given)}."""
    root = tmp_path_factory.mktemp("embeddings")
    # A1111 .pt, as its training tab saves it (two vectors); the prompt names it by the file's stem.
    torch.save(
        {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors(1, 2, 32)}, "name": "other-name",
         "step": 500, "sd_checkpoint": "abc", "sd_checkpoint_name": "tiny"},
        root / "pekora.pt",
    )
    save_file({"emb_params": vectors(2, 1, 32)}, root / "mignon.safetensors")  # A1111's safetensors
    save_file({"<cat-toy>": vectors(3, 1, 32)[0]}, root / "learned_embeds.safetensors")  # diffusers', one 1-D vector
    return {
        "a1111-pt": (root / "pekora.pt", "pekora"),
        "a1111-safetensors": (root / "mignon.safetensors", "mignon"),
        "diffusers": (root / "learned_embeds.safetensors", "<cat-toy>"),
    }


def sd_specs(embeddings) -> list[str]:
    return [f"{path}:{token}" if path.stem != token else str(path) for path, token in embeddings.values()]


def rows(prompts_and_negatives, steps: int = 4, guidance: float = 7.5, size: int = 64) -> list[Row]:
    return [
        Row(i, i, prompt, negative, 40 + i, steps, guidance, size, size)
        for i, (prompt, negative) in enumerate(prompts_and_negatives)
    ]


SD_ROWS = rows([
    ("a photo of pekora on the left", ""),
    ("a mignon square", "blurry"),
    ("a <cat-toy> and a pekora", ""),
    ("a red circle", "mignon"),
    ("a blue triangle", ""),  # no embedding: the plain model's image
])


@pytest.fixture(scope="module")
def sd_components(tiny_model, sd_embeddings):
    return load_components(with_embeddings(inspect_model(tiny_model), sd_specs(sd_embeddings), allow_pickle=True), CPU, torch.float32)


@pytest.fixture(scope="module")
def sd_reference(tiny_model, sd_embeddings):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    for path, token in sd_embeddings.values():
        pipe.load_textual_inversion(str(path), token=token)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_each_sd_format_gives_diffusers_image(sd_components, sd_reference, tiny_model):
    ours = generate(sd_components, SD_ROWS, "euler")
    plain = load_components(inspect_model(tiny_model), CPU, torch.float32)
    for i, row in enumerate(SD_ROWS):
        assert max_level_difference(ours[i], diffusers_image(sd_reference, row, "euler")) <= 1, row.prompt
    # The embeddings change the images they are named in (so the parity above is not the plain model's).
    without = generate(plain, SD_ROWS, "euler")
    assert all(max_level_difference(ours[i], without[i]) > 8 for i in range(4))
    assert max_level_difference(ours[4], without[4]) <= 1


def test_a_row_alone_equals_the_row_in_a_batch(sd_components):
    batch = generate(sd_components, SD_ROWS, "euler_a")
    for i, row in enumerate(SD_ROWS):
        assert max_level_difference(generate(sd_components, [row], "euler_a")[0], batch[i]) <= 1, row.prompt


def test_a_multi_vector_token_in_capitals_uses_all_its_vectors(sd_components, sd_reference):
    """CLIP's tokenizer lower-cases prompts, so PEKORA names the embedding too, and, as in A1111, stands for all its
    vectors: the image of "pekora". diffusers' pipelines expand a multi-vector token only where it is spelled as
    added, so their PEKORA image uses its first vector alone, and differs."""
    (lower,), (upper,) = (rows([(f"a photo of {word} on the left", "")]) for word in ("pekora", "PEKORA"))
    ours = generate(sd_components, [upper], "euler")[0]
    assert max_level_difference(ours, diffusers_image(sd_reference, lower, "euler")) <= 1
    assert max_level_difference(ours, diffusers_image(sd_reference, upper, "euler")) > 8


def test_sdxl_embeddings_load_into_both_encoders(tmp_path):
    model = str(save_tiny_sdxl(tmp_path / "tiny-sdxl", seed=3))
    file = tmp_path / "style.safetensors"
    save_file({"clip_l": vectors(4, 2, 32), "clip_g": vectors(5, 2, 48)}, file)
    components = load_components(with_embeddings(inspect_model(model), [str(file)]), CPU, torch.float32)

    pipe = StableDiffusionXLPipeline.from_pretrained(model, use_safetensors=True)
    state = load_file(file)  # as diffusers' docs load an SDXL embedding: each tensor into its encoder
    pipe.load_textual_inversion(state["clip_l"], token="style", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="style", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    pipe.set_progress_bar_config(disable=True)

    xl_rows = [
        Row(i, i, prompt, negative, 50 + i, 4, 5.0, 64, 64, original_size=(64, 64), crops_coords_top_left=(0, 0), target_size=(64, 64))
        for i, (prompt, negative) in enumerate([("a style circle", ""), ("a red square", "style"), ("a blue star", "")])
    ]
    ours = generate(components, xl_rows, "euler")
    for i, row in enumerate(xl_rows):
        assert max_level_difference(ours[i], diffusers_image(pipe, row, "euler")) <= 1, row.prompt
        assert max_level_difference(generate(components, [row], "euler")[0], ours[i]) <= 1, row.prompt
    plain = generate(load_components(inspect_model(model), CPU, torch.float32), xl_rows, "euler")
    assert max_level_difference(ours[0], plain[0]) > 8 and max_level_difference(ours[2], plain[2]) <= 1


def test_embeddings_are_part_of_the_model_and_never_leak(prefect_api, tiny_model, sd_embeddings, tmp_path):
    path, _ = sd_embeddings["a1111-safetensors"]
    file = tmp_path / path.name
    shutil.copy(path, file)
    table = write_table(tmp_path / "t.parquet", [{"id": i, "prompt": p} for i, p in enumerate(["a mignon circle", "a red square"])])
    out = tmp_path / "out"
    run = {"prompts": table, "model": tiny_model, "scheduler": "euler"}

    plain = generate_dataset(out=str(out), **run)
    plain_images = images_by_id(out)
    with_it = generate_dataset(out=str(out), embeddings=[str(file)], **run)
    # Another model: every row is made again (the first run's count as stale), and the manifest says with what.
    assert (with_it["rows"]["generated"], with_it["rows"]["stale"]) == (2, 2)
    assert with_it["resolved"]["model_fingerprint"] != plain["resolved"]["model_fingerprint"]
    sha256 = hashlib.sha256(file.read_bytes()).hexdigest()
    assert with_it["resolved"]["embeddings"] == [{"path": str(file), "token": "mignon", "sha256": sha256, "vectors": 1}]
    assert plain["resolved"]["embeddings"] == []
    # The infotext names the embedding where a row uses it, as A1111 writes it.
    made = pq.read_table(out / "data").to_pylist()
    infotext = {(r["id"], image_parameters(r["image"]["bytes"])) for r in made}
    used = [row_id for row_id, text in infotext if f'TI hashes: "mignon: {sha256[:12]}"' in text]
    assert used == [0] and sum("TI hashes" in text for _, text in infotext) == 1

    # This process now holds the model with the embedding too: a run without it gets the plain model's images.
    again = tmp_path / "again"
    generate_dataset(out=str(again), **run)
    assert {i: image.tobytes() for i, image in images_by_id(again).items()} == {i: image.tobytes() for i, image in plain_images.items()}
    with_images = {
        r["id"]: r for r in made if "TI hashes" in image_parameters(r["image"]["bytes"])
    }
    assert max_level_difference(np.asarray(Image.open(io.BytesIO(with_images[0]["image"]["bytes"]))), plain_images[0]) > 8

    # Changing the embedding's content changes the model: resume regenerates every row, then nothing.
    save_file({"emb_params": vectors(9, 1, 32)}, file)
    changed = generate_dataset(out=str(out), embeddings=[str(file)], **run)
    assert changed["rows"]["generated"] == 2
    assert changed["resolved"]["model_fingerprint"] != with_it["resolved"]["model_fingerprint"]
    unchanged = generate_dataset(out=str(out), embeddings=[str(file)], **run)
    assert (unchanged["rows"]["generated"], unchanged["rows"]["already_done"]) == (0, 2)


def test_embeddings_that_cannot_be_used_are_refused_before_any_weight_loads(tiny_model, sd_embeddings, tmp_path):
    info = inspect_model(tiny_model)
    pt, _ = sd_embeddings["a1111-pt"]
    save_file({"clip_l": vectors(1, 1, 32), "clip_g": vectors(2, 1, 48)}, tmp_path / "xl.safetensors")
    save_file({"emb_params": vectors(1, 1, 48)}, tmp_path / "wide.safetensors")
    save_file({"a": vectors(1, 1, 32), "b": vectors(2, 1, 32)}, tmp_path / "two.safetensors")
    (tmp_path / "damaged.safetensors").write_bytes(b"not safetensors")
    cases = {
        str(tmp_path / "damaged.safetensors"): "cannot be read as an embedding file",
        str(tmp_path / "missing.safetensors"): "no such file",
        str(pt): "is a pickle file, which can run code",
        str(tmp_path / "xl.safetensors"): "is an SDXL embedding (clip_l and clip_g), but the model is Stable Diffusion 1.x/2.x",
        str(tmp_path / "wide.safetensors"): "has 48-wide vectors, but model",
        str(tmp_path / "two.safetensors"): "not a textual-inversion embedding of a known format",
        f"{tmp_path / 'wide.safetensors'}:": "is empty",
    }
    for spec, phrase in cases.items():
        with pytest.raises(EmbeddingError, match=re.escape(phrase)):
            with_embeddings(info, [spec])
    one = sd_embeddings["a1111-safetensors"][0]
    with pytest.raises(EmbeddingError, match="two embeddings share the token mignon"):
        with_embeddings(info, [str(one), f"{pt}:Mignon"], allow_pickle=True)


def test_an_sd_embedding_on_sdxl_is_refused(tmp_path, sd_embeddings):
    model = str(save_tiny_sdxl(tmp_path / "tiny-sdxl", seed=3))
    with pytest.raises(EmbeddingError, match="has vectors for one text encoder .* needs one for each of its 2"):
        with_embeddings(inspect_model(model), [str(sd_embeddings["a1111-safetensors"][0])])


def test_a_token_the_tokenizer_already_has_is_refused_at_load(tiny_model, sd_embeddings):
    """The vocabulary is the tokenizer's: a clash is found when the model loads, before any image, and loads nothing."""
    path, _ = sd_embeddings["a1111-safetensors"]
    info = with_embeddings(inspect_model(tiny_model), [f"{path}:<|endoftext|>"])
    with pytest.raises(EmbeddingError, match=re.escape("its token '<|endoftext|>' is already a token of model")):
        load_components(info, CPU, torch.float32)


def test_the_command_refuses_a_bad_embedding_in_one_paragraph(prefect_api, tiny_model, tmp_path, capsys):
    table = write_table(tmp_path / "t.parquet", [{"prompt": "a red circle"}])
    save_file({"clip_l": vectors(1, 1, 32), "clip_g": vectors(2, 1, 48)}, tmp_path / "xl.safetensors")
    for spec, phrase in [(tmp_path / "nope.pt", "no such file"), (tmp_path / "xl.safetensors", "is an SDXL embedding")]:
        code, err = run_cli(capsys, table, tmp_path / "out", "--model", tiny_model, "--embedding", spec)
        assert_clean_failure(code, err, tmp_path / "out", f"--embedding {spec}", phrase)


def test_the_fingerprint_follows_content_and_token_not_path_or_order(tiny_model, sd_embeddings, tmp_path):
    info = inspect_model(tiny_model)
    a, b = (str(sd_embeddings[k][0]) for k in ("a1111-safetensors", "diffusers"))
    b_spec = f"{b}:<cat-toy>"
    both = with_embeddings(info, [a, b_spec]).fingerprint
    assert with_embeddings(info, [b_spec, a]).fingerprint == both
    copy = tmp_path / "mignon.safetensors"
    shutil.copy(a, copy)
    assert with_embeddings(info, [str(copy), b_spec]).fingerprint == both
    assert with_embeddings(info, [f"{a}:other", b_spec]).fingerprint != both
    assert len({info.fingerprint, with_embeddings(info, [a]).fingerprint, both}) == 3


@pytest.mark.filterwarnings("ignore:Artifact creation outside")  # the worker's progress artifact, here without a task
def test_a_pool_worker_reads_the_embeddings_from_its_request(prefect_api, tiny_model, sd_embeddings, tmp_path):
    """The options travel in the shard request: the worker's model is the parent's (same fingerprint), its images
    the ones made in the parent's process; a request without them is refused as another model."""
    from dataclasses import replace

    from prefect import flow

    from flows.fanout import shard_requests
    from flows.generate import check_inputs, generate_dataset as generate_here
    from flows.worker import run_shard
    from nodes.dataset.ingest import plan_prompt_table
    from nodes.errors import ModelError

    table = write_table(tmp_path / "t.parquet", [{"id": i, "prompt": p} for i, p in enumerate(["a pekora circle", "a red square"])])
    embeddings = [str(sd_embeddings["a1111-pt"][0])]
    out = tmp_path / "pool-out"
    flow_defaults = {k: v.default for k, v in inspect.signature(generate_here.fn).parameters.items() if v.default is not v.empty}
    options = {**flow_defaults, "prompts": table, "out": str(out), "model": tiny_model, "embeddings": embeddings,
               "allow_pickle": True, "scheduler": "euler", "batches_in_flight": 1}
    job = check_inputs(options)
    plan = plan_prompt_table(table, job.defaults, job.info.size_multiple, 256, identity=(job.run.sampler, job.info.fingerprint, job.run.image.key))
    (request,) = shard_requests(plan, job.defaults, job.info, job.run, options)
    with pytest.raises(ModelError, match="is not the parent's"):
        run_shard(replace(request, embeddings=()))
    flow(name="a-worker's-shard")(run_shard)(request)  # the engine submits its stages to a flow's task runner

    here = tmp_path / "here"
    generate_here(prompts=table, out=str(here), model=tiny_model, embeddings=embeddings, allow_pickle=True, scheduler="euler")
    pooled, made_here = images_by_id(out), images_by_id(here)
    assert {i: a.tobytes() for i, a in pooled.items()} == {i: a.tobytes() for i, a in made_here.items()}
