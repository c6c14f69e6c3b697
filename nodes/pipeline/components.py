"""Model inspection and loading: read a diffusers-format model's configs, then load its family's components once per process.

`inspect_model` reads only small JSON configs, so a run can validate its whole prompt table against the
model's sizes, and refuse a family it cannot run, before a single weight is loaded; it names the model by
its content (`fingerprint`, a hash of the files that shape its images, cached by file identity).
`load_components` loads the components the model's family declares (tokenizers, text encoders, U-Net, VAE)
from safetensors and keeps them for the life of the process, keyed by model, content, device and dtype.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import fsspec
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from nodes.errors import ModelError
from nodes.pipeline.checkpoint import CHECKPOINT_SUFFIXES, checkpoint_kind, is_checkpoint_file, load_checkpoint_modules, read_shapes, resolve_prediction_type, shipped_config
from nodes.pipeline.embeddings import Embedding, load_embeddings
from nodes.pipeline.family import FAMILIES, ModelFamily, family_of

log = logging.getLogger("sdflow")

# Models that ship inside the package, by the name a user passes to --model.
# sdflow:shapes is a toy Stable Diffusion trained by `python -m flows.train` on the shapes domain (nodes.shapes.domain);
# sdflow:tiny-random has the same kind of components with random weights (nodes.shapes.builders), for plumbing tests.
BUILTIN_MODELS = {"sdflow:shapes": "shapes", "sdflow:tiny-random": "tiny-random"}
DEFAULT_MODEL = "sdflow:shapes"

# Generation defaults where the model says nothing (diffusers' pipelines' defaults; guidance is the family's).
FALLBACK_STEPS = 50

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

COMPONENT_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json")


@dataclass(frozen=True)
class ModelInfo:
    """What a run needs to know about a model before loading it: its identity, sizes and defaults."""

    ref: str  # the model as the user named it: builtin name, folder, fsspec URL or hub id
    source: str  # what from_pretrained loads: a local folder or a hub id
    family: str  # a key of nodes.pipeline.family.FAMILIES
    fingerprint: str  # sha256 over the content of every file that shapes the images (see model_fingerprint), short
    vae_scale_factor: int  # image pixels per latent pixel
    size_multiple: int  # width and height must be multiples of this
    native_size: int  # U-Net sample size x VAE scale factor, the default width and height
    latent_channels: int
    default_steps: int
    default_guidance: float
    default_negative_prompt: str
    scheduler_config: dict = field(hash=False, compare=False)
    force_zeros_for_empty_prompt: bool = False  # the pipeline's config: an empty negative prompt is zeros (SDXL)
    vae: str | None = None  # a separate VAE (folder or single file) in place of the model's own; in the fingerprint
    checkpoint: str | None = None  # a single-file checkpoint holding the weights; `source` is then its configs' folder
    model_hash: str = ""  # infotext's "Model hash": a single file's sha256 (10 hex, A1111's and Civitai's), else the fingerprint's
    vae_hash: str = ""  # infotext's "VAE hash": a separate VAE file's sha256 (10 hex); "" for a folder or none
    embeddings: tuple[Embedding, ...] = ()  # textual inversion (--embedding), added at load; in the fingerprint (with_embeddings)


@dataclass
class Components:
    """A loaded model on one device: the components its family declares, by name (a pipeline without safety checker)."""

    info: ModelInfo
    modules: dict[str, object]  # component name -> tokenizer or module (eval mode, no gradients)
    device: torch.device
    dtype: torch.dtype
    load_seconds: float

    @property
    def family(self) -> ModelFamily:
        return FAMILIES[self.info.family]

    @property
    def unet(self) -> torch.nn.Module:
        return self.modules["unet"]

    @property
    def vae(self) -> torch.nn.Module:
        return self.modules["vae"]

    @property
    def tokenizer(self):
        """The first text encoder's tokenizer (the one whose limit prompts are measured against)."""
        return self.modules[self.family.text_encoders[0].tokenizer]

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.modules[self.family.text_encoders[0].text_encoder]


# Device types that hold weights and run the stages, and whether this machine has one. Any other torch device
# type is refused up front: on `meta` the weights load as shapes without values and every row would fail.
RUNNABLE_DEVICES = {"cpu": lambda: True, "cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}


def resolve_device(device: str | None) -> torch.device:
    """The requested device, or the best available: CUDA where present, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N.") from None
    if resolved.type not in RUNNABLE_DEVICES:
        what = "holds no weights (only their shapes)" if resolved.type == "meta" else "is not one sdflow runs on"
        raise ModelError(f"--device {device} {what}, so no image could be made on it; use cpu, cuda or cuda:N.")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {device} was asked for, but this machine has no CUDA device.")
    if not RUNNABLE_DEVICES[resolved.type]():
        raise ModelError(f"--device {device} was asked for, but this machine has no {resolved.type} device.")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ModelError(f"--device {device} was asked for, but this machine has {count} CUDA device(s), numbered from 0.")
    return resolved


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """The requested dtype, or the best for the device: float16 on CUDA, float32 on CPU."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def cache_root() -> Path:
    """sdflow's cache: copies of remote models and the hashes of model files."""
    return Path(os.environ.get("SDFLOW_CACHE") or Path.home() / ".cache" / "sdflow")


def builtin_model_path(name: str) -> Path:
    return Path(str(files("nodes.shapes") / "data" / BUILTIN_MODELS[name]))


def _local_model_dir(ref: str, storage_options: dict | None) -> Path | None:
    """A local folder for `ref`: builtin, local path, or a copy of a remote fsspec folder; None for a hub id."""
    if ref in BUILTIN_MODELS:
        return builtin_model_path(ref)
    if "://" in ref and not ref.startswith("file://"):
        fs, root = fsspec.core.url_to_fs(ref, **(storage_options or {}))
        listing = lambda: _remote_objects(fs, root, ref)  # noqa: E731
        if ref.lower().endswith(CHECKPOINT_SUFFIXES) and _remote_is_file(fs, root):
            # One object: copied beside nothing else, named as the user named it (its suffix says how to read it).
            path, (root, name) = root, root.rsplit("/", 1)
            listing = lambda: {name: _object_version(fs.info(path))}  # noqa: E731
        objects = listing()
        if len(objects) != 1 and "model_index.json" not in objects:
            raise ModelError(f"model {ref} has no model_index.json; it is not a diffusers-format folder.")
        # Keyed by the objects' versions, not the URL alone: a model replaced at the same URL is copied again.
        key = hashlib.sha256(json.dumps([ref, objects], sort_keys=True).encode()).hexdigest()[:16]
        local = cache_root() / "models" / key
        if not (local / ".complete").exists():
            # Object by object from the listing, never `get(recursive=True)`: that globs, and a URL with [ * ?
            # would be read as a pattern. Into a fresh folder, renamed into place once whole.
            partial = local.with_name(f".{local.name}.{os.getpid()}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            try:
                for name in objects:
                    (partial / name).parent.mkdir(parents=True, exist_ok=True)
                    fs.get_file(f"{root.rstrip('/')}/{name}", str(partial / name))
            except Exception as e:  # any store error: permissions, missing bucket, network
                shutil.rmtree(partial, ignore_errors=True)
                raise ModelError(f"model {ref} cannot be copied from its store ({type(e).__name__}: {e}).") from None
            if listing() != objects:
                shutil.rmtree(partial, ignore_errors=True)
                raise ModelError(f"model {ref} changed while it was being copied; run again once its upload is complete.")
            (partial / ".complete").touch()
            if not (local / ".complete").exists():  # else another process (a worker beside this one) was quicker
                shutil.rmtree(local, ignore_errors=True)  # never complete: a copy of an older sdflow, say
                try:
                    os.replace(partial, local)
                except OSError:  # lost the race to rename: theirs is the same objects
                    if not (local / ".complete").exists():
                        raise ModelError(f"model {ref}: its local copy at {local} cannot be made; remove it and run again.") from None
            shutil.rmtree(partial, ignore_errors=True)
        return local / next(iter(objects)) if "model_index.json" not in objects else local
    path = Path(ref.removeprefix("file://")).expanduser()
    if path.exists() or ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        return path
    return _cached_hub_snapshot(ref)


def _remote_is_file(fs, path: str) -> bool:
    try:
        return fs.isfile(path)
    except Exception:  # a store error: the listing that follows reports it
        return False


def is_hub_snapshot(path: Path) -> bool:
    """A folder of the Hugging Face cache: .../models--ORG--NAME/snapshots/COMMIT."""
    return path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--")


def complete_snapshot(snapshot: Path) -> bool:
    """A cached snapshot with weights for every model component its model_index.json names (a cache may hold only
    the configs, which inspecting a model downloads, or only another variant's weights)."""
    try:
        index = json.loads((snapshot / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    models = [
        name for name, spec in index.items()
        if isinstance(spec, list) and spec[0] and not name.startswith(("tokenizer", "scheduler", "feature_extractor"))
    ]
    return all(any((snapshot / name).glob("*.safetensors")) or any((snapshot / name).glob("*.bin")) for name in models)


HUB_PROBE_SECONDS = 5  # how long a hub id may wait for the hub to answer before it counts as unreachable


def _cached_hub_snapshot(ref: str) -> Path | None:
    """A hub id: its snapshot in the local Hugging Face cache (so it loads offline), or None to load it from the
    hub as diffusers does. Without a reachable hub, a ModelError within seconds, instead of a "missing file"
    after huggingface_hub's retries (25 s with no DNS, minutes behind a network that never answers)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(huggingface_hub.snapshot_download(ref, local_files_only=True))
        if complete_snapshot(snapshot):
            return snapshot
    except (LocalEntryNotFoundError, ValueError, OSError):  # not cached (or not a repo id at all)
        pass
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _hub_unreachable(constants.ENDPOINT)
    if why:
        raise ModelError(
            f"model {ref} is not a local folder or file, so it was taken for a Hugging Face hub id; it is not in the "
            f"local cache ({constants.HF_HUB_CACHE}), and the "
            f"hub cannot be used: {why}. Point --model at a local diffusers folder, or at a copy on your own store "
            "(s3://...), or download it once where the network allows (huggingface-cli download "
            f"{ref}) into the cache this machine reads (HF_HOME / HF_HUB_CACHE)."
        )
    return None


def _hub_unreachable(endpoint: str) -> str | None:
    """Why the hub at `endpoint` does not answer within HUB_PROBE_SECONDS (through the environment's proxies), or None."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{endpoint}/api/whoami-v2", timeout=HUB_PROBE_SECONDS).close()
    except urllib.error.HTTPError:  # it answered (401 without a token): reachable
        return None
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return f"{endpoint} did not answer within {HUB_PROBE_SECONDS} s ({type(reason).__name__}: {reason})"
    return None


# What fsspec stores report that changes with an object's content, most precise first (S3, then GCS, then any).
OBJECT_VERSION_KEYS = ("VersionId", "ETag", "etag", "generation", "md5Hash", "mtime", "LastModified")


def _remote_objects(fs, root: str, ref: str) -> dict[str, list]:
    """{path under the model's folder: [size, version]} of a remote model, from one listing (nothing downloaded)."""
    prefix = f"{root.rstrip('/')}/"  # a prefix, not a folder: s3://b/model must not match s3://b/model-2/
    try:
        listing = fs.find(prefix, detail=True)
    except Exception as e:  # any store error: permissions, missing bucket, network
        raise ModelError(f"model {ref} cannot be listed in its store ({type(e).__name__}: {e}).") from None
    objects = {}
    for path, meta in listing.items():
        if path.endswith("/") or meta.get("type") == "directory":  # a store's folder marker (S3 consoles make them)
            continue
        if path.startswith(prefix):
            objects[path[len(prefix) :]] = _object_version(meta)
    return objects


def _object_version(meta: dict) -> list:
    """[size, version] of a store's object, from its listing entry."""
    return [meta.get("size"), str(next((meta[k] for k in OBJECT_VERSION_KEYS if meta.get(k)), None))]


def _read_json(source: str, local: Path | None, name: str) -> dict:
    """One config file of the model, from its folder or (for a hub id) from the hub."""
    try:
        if local is not None:
            return json.loads((local / name).read_text())
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, name)).read_text())
    except FileNotFoundError:
        raise ModelError(f"model {source} has no {name}; it is not a complete diffusers-format folder.") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"model {source}: {name} is not valid JSON ({e}).") from None
    except PermissionError:
        raise ModelError(f"model {source}: {name} cannot be read (permission denied).") from None
    except Exception as e:  # hub errors: offline, unknown repo, gated
        raise ModelError(f"model {source} cannot be read: {type(e).__name__}: {e}") from None


def check_text_to_image(unet: dict, vae: dict, ref: str) -> None:
    """Refuse a U-Net that takes or makes more than the VAE's latents: it needs an image besides the prompt."""
    latent = vae.get("latent_channels", 4)
    channels_in, channels_out = unet.get("in_channels", 4), unet.get("out_channels", 4)
    if channels_in == channels_out == latent:
        return
    if channels_in == 2 * latent + 1:
        kind = "an inpainting model (it also takes a mask and a masked image)"
    elif channels_in != latent:
        kind = "a model conditioned on an image (depth-to-image, image editing or upscaling)"
    else:
        kind = f"a model whose U-Net predicts {channels_out} channels, not the latents"
    raise ModelError(
        f"model {ref} has a U-Net with {channels_in} input channels for its VAE's {latent}-channel latents: {kind}. "
        "sdflow generates from text only; use a text-to-image model of the same family."
    )


# The model files that shape its images, besides the family's component folders: which pipeline and scheduler.
# Not sdflow.json (its defaults resolve into each row's own values, which are keyed already) nor other folders.
FINGERPRINT_EXTRA = ("model_index.json", "scheduler")
HASH_CACHE = "file-hashes.json"
_hash_lock = threading.Lock()


def model_fingerprint(local: Path | None, family: ModelFamily, source: str, configs: dict) -> str:
    """The model's identity from its content, 16 hex digits: sha256 over the sha256 of every file in its family's
    component folders (tokenizers, text encoders, U-Net, VAE), its scheduler folder and model_index.json.

    File hashes are cached by file identity (path, size, mtime_ns, inode) in SDFLOW_CACHE, so a multi-GB
    checkpoint is read once, not every run. A hub id is named by its configs and the commit they came from.
    """
    digest = hashlib.sha256()
    if local is None or is_hub_snapshot(local):
        # A hub model is named by its commit and configs, whether it is read from the hub or from the cache (which
        # may hold other variants beside it): one identity however much of it this machine has downloaded.
        if local is None:
            from huggingface_hub import hf_hub_download

            local = Path(hf_hub_download(source, "model_index.json")).parent  # .../snapshots/<commit>/
        digest.update(json.dumps([configs, local.name], sort_keys=True).encode())
        return digest.hexdigest()[:16]
    tops = [name for name, _, _ in family.components] + list(FINGERPRINT_EXTRA)
    paths = sorted(
        (p.relative_to(local).as_posix(), p)
        for top in dict.fromkeys(tops)
        for p in ([local / top] if (local / top).is_file() else sorted((local / top).rglob("*")))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(local).parts)
    )
    _hash_files(digest, paths)
    return digest.hexdigest()[:16]


def _hash_files(digest, paths: list[tuple[str, Path]]) -> list[str]:
    """Add each (name, file)'s sha256 to `digest`, from the cache by file identity where it is current; returns them."""
    hashes = []
    with _hash_lock:
        cache, changed = _read_hash_cache(), False
        for name, path in paths:
            path = path.resolve()  # a hub snapshot's files are links to its blobs
            stat = path.stat()
            identity = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
            entry = cache.get(str(path))
            if not entry or entry[:3] != identity:
                entry = identity + [_sha256_file(path)]
                stat = path.stat()
                if [stat.st_size, stat.st_mtime_ns, stat.st_ino] == identity:  # not written to while read
                    cache[str(path)], changed = entry, True
            digest.update(f"{name}\0{entry[3]}\n".encode())
            hashes.append(entry[3])
        if changed:
            _write_hash_cache(cache)
    return hashes


def file_sha256(path: Path) -> str:
    """A file's sha256 (hex), from the hash cache where it is current."""
    return _hash_files(hashlib.sha256(), [("", path)])[0]


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_hash_cache() -> dict[str, list]:
    try:
        cache = json.loads((cache_root() / HASH_CACHE).read_text())
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):  # none yet, unreadable or damaged: hash again
        return {}


def _write_hash_cache(cache: dict[str, list]) -> None:
    """Replace the cache file whole (other processes may read it meanwhile), without entries of deleted files."""
    path = cache_root() / HASH_CACHE
    kept = {name: entry for name, entry in cache.items() if os.path.exists(name)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{HASH_CACHE}.{os.getpid()}.{threading.get_ident()}")
        temporary.write_text(json.dumps(kept))
        os.replace(temporary, path)
    except OSError as e:  # a read-only home: the fingerprint is right, only slower next time
        log.warning("cannot write the model hash cache %s (%s); model files are hashed again next run", path, e)


def inspect_model(
    ref: str | None = None,
    storage_options: dict | None = None,
    vae: str | None = None,
    prediction_type: str | None = None,
    checkpoint_config: str | None = None,
    allow_pickle: bool = False,
) -> ModelInfo:
    """Read a model's configs (no weights) and its generation defaults from its optional `sdflow.json`.

    `ref` is a diffusers folder, a hub id or a single-file checkpoint (nodes.pipeline.checkpoint), whose configs
    are `checkpoint_config` (a diffusers folder) or sdflow's for its family; `prediction_type` says what an SD 2.x file
    predicts. `vae`: a separate VAE to decode with, a diffusers folder (config.json and weights) or a single
    safetensors file of the model's own VAE architecture (original or diffusers layout, e.g. an fp16-safe SDXL VAE).
    """
    ref = ref or DEFAULT_MODEL
    local = _local_model_dir(ref, storage_options)
    checkpoint = kind = None
    if local is not None and is_checkpoint_file(local):
        checkpoint, (local, kind) = local, configs_for_checkpoint(local, ref, prediction_type, checkpoint_config, allow_pickle)
    elif prediction_type is not None or checkpoint_config is not None:
        raise ModelError(
            f"--prediction-type and --model-config describe a single-file checkpoint; model {ref} is a diffusers "
            "folder, whose own scheduler/scheduler_config.json and component configs say that."
        )
    source = str(local) if local is not None else ref
    if local is not None and not local.is_dir():
        what = "is not a model file (.safetensors, or .ckpt with --allow-pickle)" if local.is_file() else "does not exist"
        raise ModelError(f"model {ref} {what}; --model takes a diffusers folder, a single-file checkpoint or a hub id.")
    configs = {name: _read_json(source, local, name) for name in COMPONENT_FILES}
    family = family_of(configs["model_index.json"], ref)
    if kind is not None and family.name != kind_family(kind):
        raise ModelError(f"model {ref}: --model-config {checkpoint_config} is a {family.title} folder, not the checkpoint's family.")
    unet = configs["unet/config.json"]
    vae_path, vae_config = separate_vae(vae, configs["vae/config.json"])
    check_text_to_image(unet, vae_config, ref)
    vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    defaults = {}
    if local is not None and (local / "sdflow.json").exists():
        defaults = _read_json(source, local, "sdflow.json")
    sample = unet["sample_size"]
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    fingerprint = with_file(with_file(model_fingerprint(local, family, source, configs), "checkpoint", checkpoint), "vae", vae_path)
    return ModelInfo(
        ref=ref,
        source=source,
        family=family.name,
        fingerprint=fingerprint,
        vae_scale_factor=vae_scale,
        # diffusers' pipelines require multiples of 8; the VAE needs its own factor too.
        size_multiple=max(8, vae_scale),
        native_size=sample * vae_scale,
        latent_channels=unet["in_channels"],
        default_steps=int(defaults.get("steps", FALLBACK_STEPS)),
        default_guidance=float(defaults.get("guidance_scale", family.default_guidance)),
        default_negative_prompt=str(defaults.get("negative_prompt", "")),
        scheduler_config=configs["scheduler/scheduler_config.json"],
        # StableDiffusionXLPipeline's default is True; pipelines without the setting have no such rule.
        force_zeros_for_empty_prompt=bool(configs["model_index.json"].get("force_zeros_for_empty_prompt", family.name == "sdxl")),
        vae=None if vae_path is None else str(vae_path),
        checkpoint=None if checkpoint is None else str(checkpoint),
        model_hash=file_sha256(checkpoint)[:10] if checkpoint else fingerprint[:10],
        vae_hash=file_sha256(vae_path)[:10] if vae_path is not None and vae_path.is_file() else "",
    )


def configs_for_checkpoint(
    path: Path, ref: str, prediction_type: str | None, checkpoint_config: str | None, allow_pickle: bool
) -> tuple[Path, str]:
    """The diffusers folder of configs for a single-file checkpoint (--model-config, else sdflow's for its family),
    and the checkpoint's kind as its tensors say (its header is read once)."""
    kind = checkpoint_kind(read_shapes(path, ref, allow_pickle), ref)
    prediction_type = resolve_prediction_type(kind, path, ref, prediction_type)
    if checkpoint_config is not None:
        folder = Path(checkpoint_config).expanduser()
        if not (folder / "model_index.json").is_file():
            raise ModelError(f"--model-config {checkpoint_config} is not a diffusers folder (it has no model_index.json).")
        return folder, kind
    return shipped_config(kind, prediction_type, cache_root()), kind


def kind_family(kind: str) -> str:
    """The family (FAMILIES key) of a checkpoint kind: SD 1.x and 2.x are one family."""
    return "sdxl" if kind == "sdxl" else "sd"


def separate_vae(vae: str | None, model_vae_config: dict) -> tuple[Path | None, dict]:
    """The separate VAE's path and config (a single file has the model's own VAE architecture), or the model's."""
    if vae is None:
        return None, model_vae_config
    path = Path(vae).expanduser()
    if path.is_dir():
        try:
            return path, json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"--vae {vae}: a VAE folder needs the config.json of an AutoencoderKL ({e}).") from None
    if path.is_file() and path.suffix == ".safetensors":
        return path, model_vae_config
    raise ModelError(
        f"--vae {vae} is neither a diffusers VAE folder (config.json and weights) nor a .safetensors file."
    )


def with_file(fingerprint: str, label: str, path: Path | None) -> str:
    """The model's fingerprint, extended by the content of a file or folder that shapes its images (a checkpoint,
    a separate VAE): another file makes other images."""
    if path is None:
        return fingerprint
    digest = hashlib.sha256(fingerprint.encode())
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    _hash_files(digest, [(f"{label}/{p.relative_to(path).as_posix() if path.is_dir() else p.name}", p) for p in files if p.is_file()])
    return digest.hexdigest()[:16]


_loaded: dict[tuple[str, str, str, torch.dtype], Components] = {}
_load_lock = threading.Lock()


_load_count = [0]


def import_model_classes() -> None:
    """Import the model classes that load_components needs (diffusers and transformers import them lazily,
    seconds on a CPU): callers with time to spare, such as a process waiting for its Prefect server, call
    this so that the load itself does not pay for it."""
    for family in FAMILIES.values():
        for _, library, name in family.components:
            _component_class(library, name)  # the lazy import happens here


def _component_class(library: str, name: str):
    import diffusers
    import transformers

    return getattr({"diffusers": diffusers, "transformers": transformers}[library], name)


def model_loads() -> int:
    """How many times this process has loaded a model (a warm worker keeps this at one)."""
    return _load_count[0]


def load_components(
    info: ModelInfo, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False, compile: bool = False
) -> Components:
    """Load (once per process) the components of the model's family (tokenizers, text encoders, U-Net, VAE), in eval mode.

    Weights load from safetensors only: pickle checkpoints (.bin, .ckpt) can run code when loaded, so they
    are refused unless `allow_pickle`, and then with a warning.
    """
    # With embeddings (in the fingerprint) it is another copy: they mutate its tokenizers and text encoders.
    key = (info.source, info.fingerprint, str(device), dtype, compile)  # a folder whose files were replaced is another model
    with _load_lock:
        if key in _loaded:
            return _loaded[key]
        started = time.perf_counter()
        kwargs = {"use_safetensors": None if allow_pickle else True}
        if allow_pickle:
            log.warning("model %s: pickle checkpoints allowed; loading one runs whatever code it holds", info.ref)
        modules = {}
        single_file_modules.cache_clear()
        try:
            for name, library, class_name in FAMILIES[info.family].components:
                cls = _component_class(library, class_name)
                if class_name.endswith("Tokenizer"):
                    modules[name] = cls.from_pretrained(info.source, subfolder=name)
                    continue
                dtype_argument = {"dtype" if library == "transformers" else "torch_dtype": dtype}
                if name == "vae" and info.vae:
                    module = load_separate_vae(cls, info, dtype_argument, kwargs)
                elif info.checkpoint:
                    module = single_file_modules(info, dtype)[name]
                else:
                    module = cls.from_pretrained(info.source, subfolder=name, **dtype_argument, **kwargs)
                modules[name] = module.to(device).eval().requires_grad_(False)
        except (OSError, ValueError) as e:
            hint = ""
            if not allow_pickle and "safetensors" in str(e).lower():
                hint = " Its weights are not in safetensors; pass --allow-pickle to load pickle checkpoints (they can run code)."
            raise ModelError(f"model {info.ref} cannot be loaded: {e}{hint}") from None
        load_embeddings(info.embeddings, FAMILIES[info.family], modules, info.ref)
        single_file_modules.cache_clear()  # the checkpoint's other modules, once taken, are not kept twice
        # Convolutions on NHWC weights: 0-10 % off the U-Net's time on CPUs (oneDNN), the usual win for cuDNN in
        # float16, images within a level of NCHW's in float32 and float16. In bfloat16 (8 bits of mantissa) they
        # round differently from the NCHW convolutions diffusers' pipeline runs: 7 levels apart on CPU, against 1
        # in NCHW, so there the layout stays diffusers'.
        if dtype != torch.bfloat16:
            for name in ("unet", "vae"):
                modules[name].to(memory_format=torch.channels_last)
        components = Components(info, modules, device, dtype, time.perf_counter() - started)
        if compile:  # --compile: nodes.pipeline.compile
            from nodes.pipeline.compile import compile_components

            compile_components(components.unet, components.vae, str(cache_root() / "torch-compile"))
        _loaded[key] = components
        _load_count[0] += 1
        log.info("loaded %s on %s as %s in %.1f s", info.ref, device, dtype, components.load_seconds)
        return components


@functools.lru_cache(maxsize=1)
def single_file_modules(info: ModelInfo, dtype: torch.dtype) -> dict:
    """Every component of a single-file checkpoint, read in one pass (load_components takes them one by one)."""
    names = [name for name, _, _ in FAMILIES[info.family].components]
    return load_checkpoint_modules(info.checkpoint, info.source, names, dtype, info.ref)


def load_separate_vae(cls, info: ModelInfo, dtype_argument: dict, kwargs: dict):
    """`--vae`: a folder as diffusers saves one, or a single file read with the model's own VAE config (offline)."""
    if Path(info.vae).is_dir():
        return cls.from_pretrained(info.vae, **dtype_argument, **kwargs)
    return cls.from_single_file(info.vae, config=info.source, subfolder="vae", local_files_only=True, **dtype_argument)


load_components_task = task(load_components, name="load-model", cache_policy=NO_CACHE, persist_result=False)
