"""Single-file checkpoints in the original (LDM / A1111) layout: SD 1.x, SD 2.x and SDXL, loaded fully offline.

Tiny models are saved both as diffusers folders and as original-layout `.safetensors` files (tests.support.single_file);
the file, loaded through diffusers' single-file loader with the folder's configs, must make the folder's images.
The configs sdflow ships for the real families are checked against the real architectures on the meta device.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from nodes.dataset.store import image_parameters, infotext, model_fields
from nodes.errors import ModelError
from nodes.params import Row
from nodes.pipeline.checkpoint import checkpoint_kind, shipped_config
from nodes.pipeline.components import inspect_model, load_components
from nodes.shapes.builders import ToyModelConfig, build_toy_pipeline
from tests.support.models import build_tiny_sdxl
from tests.support.reference import generate, max_level_difference
from tests.support.runs import assert_clean_failure, run_cli
from tests.support.single_file import ldm_state_dict, save_single_file
from tests.support.tables import TEST_STEPS, write_table

ROWS = [
    Row(0, "a", "a small red circle on the left", "", 11, TEST_STEPS, 7.5, 64, 64),
    Row(1, "b", "a large blue square at the top", "blurry", 22, TEST_STEPS, 3.0, 64, 64),
    Row(2, "c", "a photo of a green triangle", "", 33, TEST_STEPS, 1.0, 64, 64),
]


def tiny(kind: str, seed: int):
    if kind == "sdxl":
        return build_tiny_sdxl(seed)
    return build_toy_pipeline(ToyModelConfig(seed=seed))


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    """Each family's tiny model as a user may hold it: a diffusers folder and an original-layout single file."""
    root = tmp_path_factory.mktemp("single-file")
    models = {}
    for seed, kind in enumerate(("sd1", "sd2", "sdxl")):
        pipe = tiny(kind, seed + 1)
        if kind == "sd2":
            pipe.scheduler.register_to_config(prediction_type="v_prediction")  # SD 2.1's 768-v, say
        pipe.save_pretrained(root / kind, safe_serialization=True)
        models[kind] = (str(root / kind), str(save_single_file(pipe.components, kind, root / f"{kind}.safetensors")))
    return models


def rows_for(kind: str) -> list[Row]:
    if kind != "sdxl":
        return ROWS
    xl = {"original_size": (64, 64), "crops_coords_top_left": (0, 0), "target_size": (64, 64)}  # diffusers' defaults
    return [Row(**{**r.__dict__, **xl}) for r in ROWS]


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_a_single_file_makes_the_images_of_its_diffusers_folder(held, kind, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and no network here anyway: nothing may be fetched
    folder, file = held[kind]
    extra = {"prediction_type": "v_prediction"} if kind == "sd2" else {}
    from_file = inspect_model(file, checkpoint_config=folder, **extra)
    from_folder = inspect_model(folder)
    assert from_file.family == from_folder.family and from_file.checkpoint == file
    assert from_file.scheduler_config["prediction_type"] == from_folder.scheduler_config["prediction_type"]
    assert from_file.fingerprint != from_folder.fingerprint  # named by the file's content, not the folder's
    cpu = torch.device("cpu")
    ours = generate(load_components(from_file, cpu, torch.float32), rows_for(kind), "euler_a")
    theirs = generate(load_components(from_folder, cpu, torch.float32), rows_for(kind), "euler_a")
    for i, row in enumerate(rows_for(kind)):
        assert max_level_difference(ours[i], theirs[i]) <= 1, (kind, row.id)


def test_the_family_comes_from_the_tensor_names(held):
    from nodes.pipeline.checkpoint import read_shapes

    for kind, (_, file) in held.items():
        assert checkpoint_kind(read_shapes(Path(file), file, False), file) == kind


def test_an_sd2_file_needs_its_prediction_type(held, tmp_path):
    folder, file = held["sd2"]
    with pytest.raises(ModelError, match="--prediction-type epsilon or --prediction-type v_prediction"):
        inspect_model(file, checkpoint_config=folder)
    # A1111's convention: a yaml beside the checkpoint with parameterization "v".
    beside = tmp_path / "model.safetensors"
    beside.symlink_to(file)
    (tmp_path / "model.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    info = inspect_model(str(beside))  # with sdflow's SD 2.x configs: the 768-v model's
    assert (info.scheduler_config["prediction_type"], info.native_size) == ("v_prediction", 768)
    info = inspect_model(str(beside), prediction_type="epsilon")  # the option wins: the 512 base model's
    assert (info.scheduler_config["prediction_type"], info.native_size) == ("epsilon", 512)


def test_other_single_files_are_refused_before_loading(held, tmp_path):
    from safetensors.torch import save_file

    pipe = build_toy_pipeline(ToyModelConfig(seed=9))
    state = ldm_state_dict(pipe.components, "sd1")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    save_file({**state, key: torch.zeros(state[key].shape[0], 9, *state[key].shape[2:])}, str(tmp_path / "inpaint.safetensors"))
    with pytest.raises(ModelError, match="inpainting"):
        inspect_model(str(tmp_path / "inpaint.safetensors"))
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}
    save_file(lora, str(tmp_path / "style.safetensors"))
    with pytest.raises(ModelError, match="not a full Stable Diffusion checkpoint"):
        inspect_model(str(tmp_path / "style.safetensors"))
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04 not really a pickle")
    with pytest.raises(ModelError, match="--allow-pickle"):
        inspect_model(str(tmp_path / "model.ckpt"))
    (tmp_path / "broken.safetensors").write_bytes(b"<html>not found</html>")
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        inspect_model(str(tmp_path / "broken.safetensors"))
    with pytest.raises(ModelError, match="describe a single-file checkpoint"):
        inspect_model(held["sd1"][0], prediction_type="epsilon")


def test_sdflow_generate_runs_a_single_file_offline(held, prefect_api, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, file = held["sd1"]
    table = write_table(tmp_path / "p.parquet", [{"id": r.id, "prompt": r.prompt, "seed": r.seed} for r in ROWS])
    code, err = run_cli(capsys, table, str(tmp_path / "out"), "--model", file, "--model-config", folder, "--steps", str(TEST_STEPS))
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rows"]["generated"] == len(ROWS)
    assert manifest["resolved"]["model_fingerprint"] == inspect_model(file, checkpoint_config=folder).fingerprint
    assert manifest["resolved"]["checkpoint"] == file
    # The infotext names the file as A1111 and Civitai do: the first 10 hex digits of its sha256.
    parameters = image_parameters(pq.read_table(tmp_path / "out" / "data").column("image")[0]["bytes"].as_py())
    assert f"Model hash: {hashlib.sha256(Path(file).read_bytes()).hexdigest()[:10]}, Model: {file}," in parameters
    code, err = run_cli(capsys, table, str(tmp_path / "v"), "--model", held["sd2"][1], "--model-config", held["sd2"][0])
    assert_clean_failure(code, err, tmp_path / "v", "--prediction-type")


def test_the_infotext_names_the_model_and_the_vae_by_their_hashes(held, tmp_path):
    from safetensors.torch import save_file

    folder, file = held["sd1"]
    vae = tmp_path / "vae-ft-mse.safetensors"
    save_file(build_toy_pipeline(ToyModelConfig(seed=4)).vae.state_dict(), str(vae))
    digest = hashlib.sha256(vae.read_bytes()).hexdigest()[:10]
    info = inspect_model(folder, vae=str(vae))
    assert model_fields(info) == (("Model hash", info.fingerprint[:10]), ("Model", folder), ("VAE hash", digest), ("VAE", vae.name))
    assert "Model hash: " + info.fingerprint[:10] in infotext(ROWS[0], "euler", model_fields(info), "1")
    assert model_fields(inspect_model(folder)) == (("Model hash", inspect_model(folder).fingerprint[:10]), ("Model", folder))


def test_a_single_file_on_s3_is_copied_once_and_is_the_same_model(held, s3):
    from tests.support.s3_server import BUCKET

    folder, file = held["sd1"]
    s3.put(file, f"{BUCKET}/models/[v1] sd1.safetensors")  # brackets: a URL is never read as a pattern
    s3.put(file, f"{BUCKET}/models/[v1] sd1.safetensors.bak")  # a neighbour, not copied
    url = f"s3://{BUCKET}/models/[v1] sd1.safetensors"
    remote = inspect_model(url, checkpoint_config=folder)
    copy = Path(remote.checkpoint)
    assert copy.is_file() and copy.read_bytes() == Path(file).read_bytes() and len(list(copy.parent.iterdir())) == 2
    assert remote.ref == url
    assert remote.fingerprint == inspect_model(str(copy), checkpoint_config=folder).fingerprint
    mtime = copy.stat().st_mtime_ns
    assert inspect_model(url, checkpoint_config=folder).checkpoint == str(copy) and copy.stat().st_mtime_ns == mtime


# The real architectures' parameter counts, as published (and as diffusers' and transformers' classes build them).
REAL_COUNTS = {
    ("sd1", "unet"): 859_520_964, ("sd1", "vae"): 83_653_863, ("sd1", "text_encoder"): 123_060_480,
    ("sd2", "unet"): 865_910_724, ("sd2", "vae"): 83_653_863, ("sd2", "text_encoder"): 340_387_840,
    ("sdxl", "unet"): 2_567_463_684, ("sdxl", "vae"): 83_653_863, ("sdxl", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840,
}


def meta_modules(folder: Path) -> dict[str, torch.nn.Module]:
    """A family's modules built from its configs on the meta device: shapes, no weights."""
    import diffusers
    import transformers

    index = json.loads((folder / "model_index.json").read_text())
    modules = {}
    with torch.device("meta"):
        for name, (library, class_name) in ((k, v) for k, v in index.items() if isinstance(v, list) and v[0]):
            if "Tokenizer" in class_name or "Scheduler" in class_name:
                continue
            config = json.loads((folder / name / "config.json").read_text())
            if library == "transformers":
                modules[name] = getattr(transformers, class_name)(transformers.CLIPTextConfig(**config))
            else:
                modules[name] = getattr(diffusers, class_name).from_config(config)
    return modules


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_shipped_configs_are_the_real_architectures(kind, tmp_path):
    folder = shipped_config(kind, "v_prediction" if kind == "sd2" else None, tmp_path)
    modules = meta_modules(folder)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    assert counts == {name: n for (k, name), n in REAL_COUNTS.items() if k == kind}
    # A real-size checkpoint's tensor names and shapes (written from these modules) are told as this family.
    assert checkpoint_kind(ldm_state_dict(modules, kind), kind) == kind


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_shipped_tokenizers_are_clips(kind, tmp_path):
    from transformers import CLIPTokenizer

    folder = shipped_config(kind, "epsilon" if kind == "sd2" else None, tmp_path)
    for name in ("tokenizer", "tokenizer_2"):
        if not (folder / name).is_dir():
            continue
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder=name)
        # CLIP's ids for this prompt (OpenAI's vocabulary): start, a, photo, of, a, cat, end.
        assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        ids = tokenizer("cat", padding="max_length", max_length=77).input_ids
        # SD 2.x's and SDXL's second tokenizer pad with "!" (id 0), as OpenCLIP does; SD 1.x's with the end token.
        assert ids[-1] == (0 if kind == "sd2" or name == "tokenizer_2" else 49407)


def test_shipped_configs_are_made_once(tmp_path):
    first = shipped_config("sd1", None, tmp_path)
    mtime = (first / "tokenizer" / "tokenizer_config.json").stat().st_mtime_ns
    assert shipped_config("sd1", None, tmp_path) == first
    assert (first / "tokenizer" / "tokenizer_config.json").stat().st_mtime_ns == mtime
    assert shipped_config("sd2", "epsilon", tmp_path) != shipped_config("sd2", "v_prediction", tmp_path)
    assert not [p for p in (tmp_path / "configs").iterdir() if p.name.startswith(".")]  # no partial copies left


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_a_real_size_checkpoint_loads_with_the_shipped_configs(kind, tmp_path):
    """A full-size random checkpoint of the family (GBs: run by hand, pytest -m slow), loaded with no --model-config."""
    import diffusers
    import transformers

    folder = shipped_config(kind, "epsilon" if kind == "sd2" else None, tmp_path / "cache")
    modules = {}
    for name, meta in meta_modules(folder).items():
        config = json.loads((folder / name / "config.json").read_text())
        if isinstance(meta, transformers.PreTrainedModel):
            modules[name] = type(meta)(transformers.CLIPTextConfig(**config)).half()
        else:
            modules[name] = getattr(diffusers, type(meta).__name__).from_config(config).half()
    file = save_single_file(modules, kind, tmp_path / f"{kind}-full.safetensors")
    info = inspect_model(str(file), prediction_type="epsilon" if kind == "sd2" else None)
    loaded = load_components(info, torch.device("cpu"), torch.float32)
    for name, module in modules.items():
        theirs = loaded.modules[name].state_dict()
        assert all(torch.equal(v.float(), theirs[k]) for k, v in module.state_dict().items()), name
    row = Row(0, "a", "a photo of a cat", "", 1, 1, 7.5, 64, 64)
    assert generate(loaded, [row], "euler").shape == (1, 64, 64, 3)
