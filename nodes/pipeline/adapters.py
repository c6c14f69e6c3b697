"""LoRA adapters: files named by the run, a row or a prompt tag, resolved to their content; loaded once per process
with diffusers' LoRA loaders onto the loaded components, and switched between batches with `set_adapters`.

diffusers reads both formats people hold: kohya/A1111 `.safetensors` (lora_unet_/lora_te*_ keys, lora_down/up,
alpha) and diffusers/PEFT (what `save_lora_weights` writes). Its loaders are pipeline methods, so a pipeline object
is built around sdflow's own components (no weights are read again). Where diffusers only warns (a key that matches no
layer, weights for a text encoder the model does not have), sdflow refuses the file: an ignored weight changes images
silently.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nodes.errors import ModelError, PromptTableError
from nodes.params import INVALID, GenerationDefaults, Lora, finite_number
from nodes.pipeline.components import Components, _hash_files

log = logging.getLogger("sdflow")

# AUTOMATIC1111's extra-network tag for a LoRA in a prompt: <lora:NAME> or <lora:NAME:WEIGHT> (weight 1 when absent).
LORA_TAG = re.compile(r"<lora:([^:<>]*)(?::([^<>]*))?>")
SUFFIX = ".safetensors"  # what a LoRA named without a path is looked up as, in --lora-dir


def without_lora_tags(prompt: str) -> str:
    """The prompt as the text encoder sees it: A1111 removes its <lora:...> tags and leaves the rest as it is."""
    return LORA_TAG.sub("", prompt)


# --- naming LoRAs: files and their content ---

_files: dict[tuple, tuple[str, str, str]] = {}  # (path, size, mtime_ns, inode) -> (path, sha256, A1111's): hashed once
_named_by: dict[str, str] = {}  # sha256 -> who first named it (an option, a row), for messages about the file
_named: dict[str, dict] = {}  # sha256 -> {name, path, sha256} of each file the run names (see forget_named)


def lora_file(path: Path, weight: float, named_by: str) -> Lora | None:
    """The LoRA at `path` (a .safetensors file) at `weight`, named by its content; None if there is no such file."""
    try:
        stat = path.stat()
    except OSError:
        return None
    if not path.is_file():
        return None
    identity = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if identity not in _files:  # sha256 from sdflow's hash cache (by file identity): a large file is read once
        _files[identity] = (str(path), _hash_files(hashlib.sha256(), [(path.name, path)])[0], a1111_hash(path))
    where, sha256, short_hash = _files[identity]
    _named_by.setdefault(sha256, named_by)
    _named.setdefault(sha256, {"name": path.stem, "path": where, "sha256": sha256})
    return Lora(path.stem, where, sha256, weight, short_hash)


def parse_lora_option(text: str) -> tuple[str, float | None]:
    """`--lora PATH[:WEIGHT]` -> (PATH, WEIGHT); the weight is 1 when absent, None when it is not a finite number."""
    ref, sep, tail = text.rpartition(":")
    if not sep or "/" in tail or "\\" in tail or tail.endswith(SUFFIX):  # no weight: the colon is the path's own
        return text, 1.0
    try:
        weight = float(tail)
    except ValueError:
        return ref, None
    return ref, weight if math.isfinite(weight) else None


def run_loras(options: list[str] | None, lora_dir: str | None) -> tuple[Lora, ...] | None:
    """The run's --lora options resolved to files (a path, else a name in --lora-dir); None where the run uses no LoRA.

    Raises ModelError naming the option for a missing file, a bad weight or a LoRA given twice.
    """
    if lora_dir is not None and not Path(lora_dir).expanduser().is_dir():
        raise ModelError(f"--lora-dir {lora_dir} is not a folder; it must hold the LoRAs that rows name, as NAME{SUFFIX}.")
    if not options and lora_dir is None:
        return None
    loras: dict[str, Lora] = {}
    for option in options or []:
        ref, weight = parse_lora_option(option)
        if weight is None:
            raise ModelError(f"--lora {option}: its weight (after the last colon) is not a finite number; write PATH or PATH:0.8.")
        path = Path(ref).expanduser()
        if not path.exists() and lora_dir is not None and not ref.endswith(SUFFIX):  # a name: NAME.safetensors there
            path = Path(lora_dir).expanduser() / f"{ref}{SUFFIX}"
        lora = lora_file(path, weight, f"--lora {option}")
        if lora is None:
            where = f" (nor is {path})" if str(path) != str(Path(ref).expanduser()) else ""
            raise ModelError(f"--lora {option}: {ref} is not a file{where}. Give the path of a LoRA .safetensors file (or its name with --lora-dir).")
        if lora.sha256 in loras:
            raise ModelError(f"--lora {option}: the same LoRA file ({lora.path}) is given twice; give it once, at one weight.")
        loras[lora.sha256] = lora
    return tuple(loras.values())


def resolve_row_loras(value, defaults: GenerationDefaults, row: dict, in_table: bool) -> tuple[Lora, ...] | None:
    """A row's LoRA set: the run's --lora, then its own `loras` entries and its prompt's tags (a row's own weight for a
    file the run names wins), ordered by content. None where the run uses no LoRA; INVALID for a malformed entry.

    A file that does not exist raises PromptTableError naming the row and the file: no row can fix it.
    """
    tags = LORA_TAG.findall(row["prompt"])
    if defaults.loras is None and not in_table:
        return INVALID if tags else None  # a tag needs --lora-dir to name a file
    asked = []  # (how the row names it, a path, or None for a name in --lora-dir; weight)
    for entry in value if value is not None else []:
        if not isinstance(entry, dict) or (entry.get("name") is None) == (entry.get("path") is None):
            return INVALID
        asked.append((entry.get("name") or entry["path"], entry.get("path"), finite_number(entry.get("weight"))))
    for name, weight in tags:
        asked.append((name, None, 1.0 if weight == "" else _tag_weight(weight)))
    own: dict[str, Lora] = {}
    for ref, path, weight in asked:
        if weight is None or not ref or (path is None and defaults.lora_dir is None):
            return INVALID
        file = Path(path).expanduser() if path is not None else Path(defaults.lora_dir).expanduser() / f"{ref}{SUFFIX}"
        lora = lora_file(file, weight, f"row {row['id']!r}")
        if lora is None:
            how = f"its LoRA path {path}" if path is not None else f"LoRA {ref!r}, but --lora-dir has no {file.name}"
            raise PromptTableError(f"row {row['id']!r} names {how} ({file} does not exist); fix the name or the folder.")
        if lora.sha256 in own:
            return INVALID
        own[lora.sha256] = lora
    merged = {lora.sha256: lora for lora in defaults.loras or ()} | own
    return tuple(sorted(merged.values(), key=lambda lora: lora.sha256))


def _tag_weight(text: str) -> float | None:
    try:
        return finite_number(float(text))
    except ValueError:
        return None


def a1111_hash(path: Path) -> str:
    """The hash AUTOMATIC1111's infotext gives a LoRA (`Lora hashes`), by which readers and Civitai find the file: the
    `sshs_model_hash` of its metadata where it has one, else the sha256 of the file after its safetensors header
    (A1111's "addnet" hash, so that editing the metadata keeps it); 12 hex digits. "" for a file that is not safetensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get("sshs_model_hash")
        if stored:
            return stored[:12]
        with open(path, "rb") as f:
            f.seek(8 + int.from_bytes(f.read(8), "little"))
            return hashlib.file_digest(f, "sha256").hexdigest()[:12]
    except Exception:  # not a safetensors file: loading it says so, naming it
        return ""


# --- adapters on the loaded components ---


@dataclass
class AdapterState:
    """The LoRAs loaded onto one Components (once per process) and the set now active."""

    pipeline: object  # a diffusers pipeline around the components' own modules: its LoRA loaders and set_adapters
    names: dict[str, str] = field(default_factory=dict)  # sha256 -> adapter name
    active: tuple = ()  # ((sha256, weight), ...) now set; () with adapters disabled


_states: dict[int, tuple[Components, AdapterState]] = {}  # by id(components); holds them, so ids stay theirs
_counts = {"loads": 0, "switches": 0}  # this process's, for the manifest and shard markers


def adapter_counts() -> dict[str, int]:
    """How many LoRA files this process has loaded and how many times it has switched the active set."""
    return dict(_counts)


def _state(components: Components) -> AdapterState:
    if id(components) not in _states:
        _states[id(components)] = (components, AdapterState(_pipeline(components)))
    return _states[id(components)][1]


def _pipeline(components: Components):
    """The family's diffusers pipeline built around the loaded modules (shared, not copied), for its LoRA loaders."""
    import diffusers

    modules = components.modules
    config = components.info.scheduler_config  # never stepped: the loaders only need a complete pipeline
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    if components.family.name == "sdxl":
        return diffusers.StableDiffusionXLPipeline(**modules, scheduler=scheduler, add_watermarker=False)
    return diffusers.StableDiffusionPipeline(
        **modules, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def active_set(components: Components) -> tuple:
    """The ((sha256, weight), ...) set active on `components` now; () if none."""
    return _states[id(components)][1].active if id(components) in _states else ()


def load_lora(components: Components, lora: Lora) -> str:
    """Load `lora` onto the components' U-Net and text encoders (once per process); returns its adapter name.

    Raises ModelError when the file cannot be read or does not fit the model: any of its weights left unloaded.
    """
    state = _state(components)
    if lora.sha256 in state.names:
        return state.names[lora.sha256]
    name = f"lora-{lora.sha256[:16]}"
    pipe = state.pipeline
    what = f"LoRA {lora.path} (named by {_named_by.get(lora.sha256, 'the run')})"
    try:
        weights = _norms(_file_matrices(lora.path))
    except Exception as e:  # not safetensors, damaged
        raise ModelError(f"{what} cannot be read as a .safetensors LoRA ({type(e).__name__}: {e}).") from None
    try:
        with _quiet_transformers():
            pipe.load_lora_weights(lora.path, adapter_name=name)
        loaded = _norms(_adapter_matrices(components, name))
    except Exception as e:  # shapes of another architecture, keys diffusers cannot map
        _delete(pipe, name)
        raise ModelError(
            f"{what} does not fit model {components.info.ref} (family {components.info.family}): diffusers could not "
            f"load it ({type(e).__name__}: {str(e)[:300]}). Use a LoRA made for this model's family."
        ) from None
    if len(loaded) != len(weights) or not torch.allclose(loaded, weights, rtol=1e-2, atol=1e-6):
        _delete(pipe, name)
        unplaced = f"{len(weights) - len(loaded)} of its {len(weights)}" if len(loaded) < len(weights) else "some of its"
        raise ModelError(
            f"{what} does not fit model {components.info.ref} (family {components.info.family}): {unplaced} LoRA "
            "matrices match no layer of the model's U-Net or text encoders (diffusers would ignore them, or start "
            "their layers from random values). Use a LoRA made for this model's family (an SDXL LoRA on SD 1.x, for "
            "instance, names a second text encoder)."
        )
    state.names[lora.sha256] = name
    _counts["loads"] += 1
    log.info("loaded LoRA %s (sha256 %s) as adapter %s", lora.path, lora.sha256[:12], name)
    return name


# Whether every matrix of a file landed in the model is checked by content, not by name (kohya's names and PEFT's
# differ, and diffusers renames both): the sorted norms of the file's LoRA matrices must be those of the adapter's
# parameters. A matrix that matched no layer is missing from the model; one that PEFT created but did not find in
# the file (a layer named otherwise) holds random values: either way the norms differ.


def _file_matrices(path: str):
    """The file's LoRA matrices (kohya's alphas and DoRA scales aside, which diffusers drops or keeps apart)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            if not key.endswith(".alpha") and "dora_scale" not in key:
                yield f.get_tensor(key)


def _adapter_matrices(components: Components, name: str):
    """The LoRA matrices of adapter `name` in the components' modules (PEFT's lora_A/lora_B)."""
    marker = f".{name}."
    for module in components.modules.values():
        if isinstance(module, torch.nn.Module):
            for key, parameter in module.named_parameters():
                if marker in key and ".lora_" in key:
                    yield parameter


def _norms(matrices) -> torch.Tensor:
    return torch.tensor(sorted(float(m.detach().float().norm()) for m in matrices), dtype=torch.float64)


@contextmanager
def _quiet_transformers():
    """transformers' load report for a text encoder lists the adapters loaded before as "MISSING" (they are not in
    this file): a warning on every load after the first, and a false one. The fit check above is what counts."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def _delete(pipe, name: str) -> None:
    try:
        pipe.delete_adapters([name])
    except Exception:  # nothing of it was loaded
        pass


def use_loras(components: Components, loras: tuple[Lora, ...] | None) -> None:
    """Make `loras` (at their weights) the active adapters, loading any not loaded yet; none: adapters disabled.

    A no-op when the set is already active, so batches of one set cost one switch.
    """
    wanted = tuple((lora.sha256, lora.weight) for lora in loras or ())
    if id(components) not in _states and not wanted:
        return  # no LoRA ever loaded on these components: nothing to disable
    state = _state(components)
    if wanted == state.active:
        return
    names = [load_lora(components, lora) for lora in loras or ()]
    from diffusers.utils.peft_utils import set_adapter_layers

    for module in components.modules.values():
        if isinstance(module, torch.nn.Module):
            set_adapter_layers(module, enabled=bool(wanted))
    if wanted:
        state.pipeline.set_adapters(names, [lora.weight for lora in loras])
    state.active = wanted
    _counts["switches"] += 1


def preload_loras(components: Components) -> int:
    """Load every LoRA the run names (named_loras) onto `components` before generating, so that a file that does
    not fit the model stops the run before any image is made; returns how many were loaded now."""
    before = _counts["loads"]
    for file in named_loras():
        load_lora(components, Lora(file["name"], file["path"], file["sha256"], 1.0))
    return _counts["loads"] - before


def named_loras() -> list[dict]:
    """The LoRA files named since forget_named() (the run's options and rows), for the manifest: name, path, sha256."""
    return sorted(_named.values(), key=lambda f: (f["name"], f["sha256"]))


def forget_named() -> None:
    """Start a run's record of the LoRA files it names."""
    _named.clear()
    _named_by.clear()

