"""Single-file checkpoints: an original-layout (LDM / A1111) `.safetensors` file, as Civitai and Stability distribute them.

The family is read from the file's tensor names and shapes (its header only, nothing loaded): SD 1.x has a CLIP text
encoder (`cond_stage_model.transformer.`), SD 2.x an OpenCLIP one (`cond_stage_model.model.`), SDXL base both
(`conditioner.embedders.`); anything else diffusers can name (an inpainting U-Net, a refiner, SD3, Flux...) is refused.
The weights then load through diffusers' own single-file loader with `config=` a local diffusers folder of configs,
so nothing is fetched from the hub: the family's configs ship with sdflow (nodes/pipeline/configs: a few kilobytes
of JSON per family, checked against the real architectures' parameter counts in the tests) plus CLIP's BPE vocabulary
(open_clip's `bpe_simple_vocab_16e6.txt.gz`, MIT), from which the tokenizers are derived once into SDFLOW_CACHE.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from importlib.resources import files
from pathlib import Path

import torch

from nodes.errors import ModelError

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
PREDICTION_TYPES = ("epsilon", "v_prediction")

# The families sdflow drives, by the kinds diffusers' `infer_diffusers_model_type` names (SD 1.x and 2.x share
# one, "v1", unless the cross-attention width is SD 2's 1024: the text encoder's layout decides).
KINDS = {"v1": "sd1", "v2": "sd2", "xl_base": "sdxl"}
KIND_TITLES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL base"}
OPEN_CLIP_KEY = "cond_stage_model.model.token_embedding.weight"  # SD 2.x's text encoder
SDXL_KEYS = {"conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight", "conditioner.embedders.1.model.positional_embedding"}
SD2_NATIVE_SAMPLE = {"epsilon": 64, "v_prediction": 96}  # 512-base and 768-v: the U-Net's sample size


def is_checkpoint_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES


def read_shapes(path: Path, ref: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as meta tensors (names and shapes, no values): a safetensors header, read at once."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelError(
                f"model {ref} is a pickle checkpoint ({path.suffix}), which can run code when loaded; convert it to "
                "safetensors, or pass --allow-pickle if you trust its source."
            )
        from diffusers.loaders.single_file_utils import load_single_file_checkpoint

        state = load_single_file_checkpoint(str(path), local_files_only=True)
        return {k: torch.empty(v.shape, device="meta") for k, v in state.items() if isinstance(v, torch.Tensor)}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except Exception as e:  # not a safetensors file at all (truncated, HTML from a failed download, ...)
        raise ModelError(f"model {ref} is not a readable safetensors file ({type(e).__name__}: {e}).") from None


def checkpoint_kind(shapes: dict[str, torch.Tensor], ref: str) -> str:
    """sd1, sd2 or sdxl, from the tensor names; refuses any other model, naming what diffusers takes it for."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        kind = infer_diffusers_model_type(shapes)
    except Exception:  # a file that is no diffusion model at all (a LoRA, a VAE, an embedding)
        kind = None
    if kind == "v1":
        # diffusers tells SD 2.x by its 1024-wide cross-attention and SDXL by its second encoder's tenth layer;
        # smaller models of the same layout (distilled ones, the tests' tiny ones) are told by their text encoders.
        if OPEN_CLIP_KEY in shapes:
            kind = "v2"
        elif SDXL_KEYS <= shapes.keys():
            kind = "xl_base"
    has_unet = any(k.startswith("model.diffusion_model.") for k in shapes)
    if kind in KINDS and has_unet:
        return KINDS[kind]
    found = f"a {kind} checkpoint" if kind and has_unet else "not a full Stable Diffusion checkpoint (it has no U-Net under model.diffusion_model.: a LoRA, a VAE or an embedding, say)"
    raise ModelError(
        f"model {ref} is {found}, which sdflow cannot run as a single file; it runs {', '.join(KIND_TITLES.values())} "
        "checkpoints (text-to-image, original layout), or any of those families as a diffusers folder."
    )


def sidecar_prediction_type(path: Path) -> str | None:
    """A1111's convention: a `model.yaml` beside `model.safetensors` whose `parameterization: "v"` marks a v model."""
    sidecar = path.with_suffix(".yaml")
    if not sidecar.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(sidecar.read_text()) or {}
        params = config.get("model", {}).get("params", {})
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    return {"v": "v_prediction", "eps": "epsilon"}.get(params.get("parameterization", "eps"))


def resolve_prediction_type(kind: str, path: Path, ref: str, prediction_type: str | None) -> str | None:
    """The prediction type for an SD 2.x file: the option, else its A1111 sidecar yaml, else an error asking for it."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ModelError(f"--prediction-type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}.")
    if kind != "sd2":
        return prediction_type
    found = prediction_type or sidecar_prediction_type(path)
    if found is None:
        raise ModelError(
            f"model {ref} is a Stable Diffusion 2.x checkpoint, and its tensors do not say whether it predicts noise "
            "(epsilon: the 512-pixel base models) or velocity (v_prediction: the 768-pixel models): pass "
            "--prediction-type epsilon or --prediction-type v_prediction (or put A1111's yaml beside it)."
        )
    return found


def _vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's tokenizer vocabulary and merges, derived from the BPE file as open_clip and OpenAI's CLIP do."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    bpe = files("nodes.pipeline") / "configs" / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    pieces = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {piece: i for i, piece in enumerate(pieces)}, merges


def shipped_config(kind: str, prediction_type: str | None, cache: Path) -> Path:
    """A local diffusers folder of the family's configs and tokenizers (no weights), made once in `cache`."""
    shipped = Path(str(files("nodes.pipeline") / "configs" / kind))
    configs = {p.relative_to(shipped).as_posix(): json.loads(p.read_text()) for p in sorted(shipped.rglob("*.json"))}
    if kind == "sd2":
        configs["scheduler/scheduler_config.json"]["prediction_type"] = prediction_type
        configs["unet/config.json"]["sample_size"] = SD2_NATIVE_SAMPLE[prediction_type]
        configs["unet/config.json"]["upcast_attention"] = prediction_type == "v_prediction"  # as SD 2.1 (768-v) ships
    key = hashlib.sha256(json.dumps(configs, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache / "configs" / f"{kind}-{key}"
    if (folder / ".complete").exists():
        return folder
    from transformers import CLIPTokenizer

    partial = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    vocab, merges = _vocabulary()
    for name, config in configs.items():
        (partial / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("tokenizer_config.json"):  # the tokenizer's own files, as transformers saves them
            settings = {k: v for k, v in config.items() if k != "tokenizer_class"}
            CLIPTokenizer(vocab=vocab, merges=merges, **settings).save_pretrained(partial / Path(name).parent)
        else:
            (partial / name).write_text(json.dumps(config, indent=2))
    (partial / ".complete").touch()
    try:
        os.replace(partial, folder)
    except OSError:  # another process made it first: the same content
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def load_checkpoint_modules(checkpoint: str, config: str, names: list[str], dtype: torch.dtype, ref: str) -> dict:
    """The named components of a single-file checkpoint, through diffusers' single-file loader, fully offline."""
    import diffusers

    pipeline_class = getattr(diffusers, json.loads((Path(config) / "model_index.json").read_text())["_class_name"])
    extra = {"safety_checker": None, "requires_safety_checker": False} if pipeline_class is diffusers.StableDiffusionPipeline else {}
    try:
        pipe = pipeline_class.from_single_file(checkpoint, config=config, local_files_only=True, torch_dtype=dtype, **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # shapes that do not fit the configs, a damaged file
        raise ModelError(
            f"model {ref} cannot be loaded as a single-file checkpoint with the configs in {config}: "
            f"{type(e).__name__}: {e}. If it is a fine-tune with another architecture, pass --model-config with a "
            "diffusers folder (configs suffice) that describes it."
        ) from None
    return {name: pipe.components[name] for name in names}
