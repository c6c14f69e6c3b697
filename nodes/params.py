"""The parameters of a generation run: the table of samplers, the registry of per-row columns, and the records built from them.

Adding a sampler is one `Sampler` entry in SAMPLERS; adding a per-row column is one `Column` entry in COLUMNS
(its type, its check, its default, whether it enters the row key, how it is written): `Row`, the prompt-table
checks, the row key and the output schema all follow from it.
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from decimal import Decimal
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_STEPS = 1000  # the training schedule's length: schedulers cannot take more inference steps
MAX_SIDE = 4096  # pixels; larger sides are refused as almost certainly a mistake in the table
MAX_SEED = 2**63 - 1  # seeds are stored as int64; torch.Generator.manual_seed accepts all of these
MAX_PAIR = 65536  # pixels, for SDXL's size and crop conditioning (what it was trained on is far below)
MAX_CLIP_SKIP = 100  # beyond any CLIP's depth; the model's own limit is checked against its text encoders
# Images one row may make (A1111's UI makes at most 100 batches of 8). Planning holds ~20 bytes per image of a chunk
# of 65,536 rows (measured: 256 MiB at 100 images each), so the bound keeps it flat; for more, repeat the row under
# other ids.
MAX_IMAGES = 100


@dataclass(frozen=True)
class Sampler:
    """A sampler users know by name (AUTOMATIC1111, ComfyUI): a diffusers scheduler class with config overrides."""

    scheduler: str  # diffusers scheduler class
    overrides: dict = field(default_factory=dict, hash=False)  # on top of the model's own scheduler config
    a1111: str = ""  # the name AUTOMATIC1111's infotext gives it
    schedule: str | None = None  # A1111's "Schedule type", where it is not the default


# The samplers, by their sdflow name. "dpmpp_2m" is DPM-Solver++ of order 2, multistep.
SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler("DDIMScheduler", a1111="DDIM"),
    "pndm": Sampler("PNDMScheduler", a1111="PLMS"),
    "lms": Sampler("LMSDiscreteScheduler", a1111="LMS"),
    "euler": Sampler("EulerDiscreteScheduler", a1111="Euler"),
    "euler_a": Sampler("EulerAncestralDiscreteScheduler", a1111="Euler a"),
    "heun": Sampler("HeunDiscreteScheduler", a1111="Heun"),
    "dpmpp_2m": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM++ 2M"),
    "dpmpp_2m_karras": Sampler(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M",
        "Karras",
    ),
    "unipc": Sampler("UniPCMultistepScheduler", a1111="UniPC"),
}


@dataclass(frozen=True)
class Lora:
    """A LoRA file applied at a weight: one adapter of a row's set."""

    name: str  # its file's stem, as AUTOMATIC1111 names LoRAs (written to the dataset and the infotext)
    path: str  # where it was read
    sha256: str  # the file's content (hex): its identity in the row key, the manifest and the infotext
    weight: float  # diffusers' adapter weight (set_adapters), A1111's <lora:name:weight>
    short_hash: str = ""  # what A1111's infotext gives as its hash (nodes.pipeline.adapters.a1111_hash), 12 hex digits


@dataclass(frozen=True)
class GenerationDefaults:
    """Run-level values; a row's own non-null column overrides each of them."""

    steps: int  # denoising steps
    guidance_scale: float  # classifier-free guidance scale; <= 1 turns guidance off, as in diffusers
    width: int  # image width in pixels, a multiple of the model's size multiple
    height: int  # image height in pixels, likewise
    negative_prompt: str  # what to steer away from; "" is the unconditional prompt
    seed: int  # run seed; rows without a seed get one derived from it and their id
    family: str = "sd"  # the model's family (nodes.pipeline.family): which columns its rows resolve
    guidance_rescale: float = 0.0  # diffusers' rescale_noise_cfg factor in [0, 1]; 0 leaves guidance as it is
    clip_skip: int = 0  # diffusers' clip_skip: text encoder layers skipped before the family's own; 0 skips none
    loras: tuple[Lora, ...] | None = None  # --lora, for every row; None: the run uses no LoRA (rows' loras stay None)
    lora_dir: str | None = None  # --lora-dir: where a LoRA named without a path is found, as NAME.safetensors
    images: int = 1  # images each row makes (--images-per-prompt), each its own output row (image_seed)


# --- checks: a value as read from the table (or an option) -> the resolved value, or None if invalid ---


def whole_number(value, low: int, high: int) -> int | None:
    """`value` as an int if it is a whole number in [low, high], else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        return None
    if isinstance(value, Decimal):  # a decimal column: exact, so 20.00 is whole and 20.5 is not
        if not value.is_finite() or value != value.to_integral_value():
            return None
        value = int(value)
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            return None
        value = int(value)
    return value if low <= value <= high else None


def finite_number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        return None
    if isinstance(value, Decimal) and not value.is_finite():
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def unit_fraction(value) -> float | None:
    value = finite_number(value)
    return value if value is not None and 0.0 <= value <= 1.0 else None


def image_side(value, size_multiple: int) -> int | None:
    """A width or height if it is a positive multiple of `size_multiple` up to MAX_SIDE, else None."""
    side = whole_number(value, size_multiple, MAX_SIDE)
    return side if side is not None and side % size_multiple == 0 else None


def derive_seed(run_seed: int, row_id: int | str) -> int:
    """A row's seed when the table gives none: a stable hash of the run seed and the row id, in [0, 2**63)."""
    digest = hashlib.blake2b(f"{run_seed}\x1f{row_id!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def image_seed(seed: int, image_index: int) -> int:
    """The seed of a row's image `image_index`: the row's seed plus the index, as A1111 seeds the images of a batch,
    wrapped into [0, MAX_SEED]. Image 0 is the row's own seed, so a row's first image is its single image."""
    return (seed + image_index) % (MAX_SEED + 1)


# What a table column may hold: (predicate on its Arrow type, words for the error message).
def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _pair(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and _numeric(t.value_type)


def _loras(t: pa.DataType) -> bool:
    """A list of structs with a `name` or a `path` (text) and a `weight` (a number)."""
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        return False
    fields = {f.name: f.type for f in t.value_type}
    names = [fields[n] for n in ("name", "path") if n in fields]
    return bool(names) and all(_text(n) for n in names) and "weight" in fields and _numeric(fields["weight"])


KINDS: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    "id": (lambda t: pa.types.is_integer(t) or _text(t), "an integer or a string"),
    "text": (_text, "a string"),
    "integer": (_numeric, "an integer"),
    "number": (_numeric, "a number"),
    "pair": (_pair, "a list of two integers"),
    "loras": (_loras, "a list of structs {name or path: string, weight: number}"),
}

# The `loras` column as the dataset holds it (and as a prompt table may give it, or with `path` for `name`).
LORAS_TYPE = pa.list_(pa.struct([("name", pa.string()), ("weight", pa.float64())]))
LORAS_RULE = (  # a format string (Column.rule): braces doubled
    "must be a list of {{name or path, weight}}: a LoRA named by its file's stem in --lora-dir or by the path of its "
    ".safetensors file, at a finite weight, each LoRA once (so must the prompt's <lora:name:weight> tags, which need "
    "--lora-dir)"
)


def _loras_key(loras: tuple[Lora, ...] | None) -> list | None:
    return [[lora.sha256, lora.weight] for lora in loras] if loras else None


def _loras_written(loras: tuple[Lora, ...] | None) -> list | None:
    return None if loras is None else [{"name": lora.name, "weight": lora.weight} for lora in loras]


def pixel_pair(value, _m) -> tuple[int, int] | None:
    """Two whole numbers from 0 to MAX_PAIR, as a tuple (a diffusers size or crop: (height, width), (top, left))."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    pair = tuple(whole_number(v, 0, MAX_PAIR) for v in value)
    return None if None in pair else pair


REQUIRED = object()  # a Column's `neutral` where a Row must always be given the column
INVALID = object()  # what a column's resolver (nodes.dataset.ingest.RESOLVERS) returns for a value it refuses


@dataclass(frozen=True)
class Column:
    """A per-row column of the prompt table: read, checked, defaulted, keyed, written to the dataset."""

    name: str
    type: type  # its Python type in Row
    kind: str  # what the table may hold: a key of KINDS
    written: pa.DataType | None  # its Arrow type in the dataset; None: as the table holds it
    check: Callable[[Any, int], Any]  # (value, size multiple) -> the resolved value, or None if invalid
    rule: str  # what a valid value is, for error messages; "{m}" is the size multiple
    # (run defaults, the row's columns resolved so far) -> the value of a null; None: a null is invalid
    default: Callable[[GenerationDefaults, dict], Any] | None = None
    in_key: bool = True  # part of the row key: changing it makes a new image
    families: tuple[str, ...] | None = None  # the model families that read it (None: all); for others it stays None,
    # enters no key and is not written, so adding a family's column changes nothing for the others
    neutral: Any = REQUIRED  # its value in a Row built without it (a family's columns: None), so rows stay easy to write
    # `check` over a whole column, for planning at table scale: (values, size multiple) -> a bool mask of the values
    # it accepts. Given an int64/uint64 NumPy array for integer columns, an Arrow string array for text (nulls: any
    # answer). None: `check` is called per distinct value or per row. Must agree with `check` value for value.
    check_array: Callable[[Any, int], np.ndarray] | None = None
    key_value: Callable[[Any], Any] | None = None  # what of a value enters the row key (None: left out); default all
    written_value: Callable[[Any], Any] | None = None  # a value as the dataset holds it; default as it is
    stored: bool = True  # written to each output row; False: it only shapes the run (how many images a row makes)


def is_blank(text: str) -> bool:
    """True if nothing is left of `text` without whitespace, format (Cf: zero-width, BOM, bidi marks) and control
    (Cc: NUL) characters: text that renders as nothing, which a text encoder sees as an empty prompt."""
    return all(c.isspace() or unicodedata.category(c) in ("Cf", "Cc") for c in text)


def _prompt(value, _m):
    return value if isinstance(value, str) and not is_blank(value) else None


def _prompt_array(values: pa.Array, m: int) -> np.ndarray:
    """_prompt over a string array: a prompt holding a printable ASCII character is not blank; others are checked one by one."""
    accepted = pc.fill_null(pc.match_substring_regex(values, "[!-~]"), False).to_numpy(zero_copy_only=False).copy()
    for i in np.flatnonzero(~accepted).tolist():
        accepted[i] = _prompt(values[i].as_py(), m) is not None
    return accepted


def _any_value(values, _m) -> np.ndarray:
    return np.ones(len(values), dtype=bool)


def _whole_numbers(low: int, high: int) -> Callable[[np.ndarray, int], np.ndarray]:
    """whole_number(v, low, high) over an integer array."""
    return lambda a, _m: (a >= low) & (a <= high)


def _image_sides(a: np.ndarray, m: int) -> np.ndarray:
    """image_side over an integer array."""
    return (a >= m) & (a <= MAX_SIDE) & (a % m == 0)


# The prompt table's columns that sdflow reads, in the order of Row's fields and of the row key; every other
# column of the table is carried through to the dataset untouched.
COLUMNS: tuple[Column, ...] = (
    Column("id", object, "id", None, lambda v, m: v, "must not be null", check_array=_any_value),
    Column(
        "prompt", str, "text", pa.string(), _prompt, "must be a non-empty string (not only spaces, invisible or control characters)",
        check_array=_prompt_array,
    ),
    Column("negative_prompt", str, "text", pa.string(), lambda v, m: v, "", lambda d, r: d.negative_prompt, check_array=_any_value),
    Column(
        "seed", int, "integer", pa.int64(), lambda v, m: whole_number(v, 0, MAX_SEED),
        f"must be a whole number from 0 to {MAX_SEED}", lambda d, r: derive_seed(d.seed, r["id"]),
        check_array=_whole_numbers(0, MAX_SEED),
    ),
    Column(
        "steps", int, "integer", pa.int32(), lambda v, m: whole_number(v, 1, MAX_STEPS),
        f"must be a whole number from 1 to {MAX_STEPS}", lambda d, r: d.steps, check_array=_whole_numbers(1, MAX_STEPS),
    ),
    Column(
        "guidance_scale", float, "number", pa.float64(), lambda v, m: finite_number(v), "must be a finite number",
        lambda d, r: d.guidance_scale,
    ),
    Column(
        "width", int, "integer", pa.int32(), image_side, "must be a multiple of {m} from {m} to %d" % MAX_SIDE, lambda d, r: d.width,
        check_array=_image_sides,
    ),
    Column(
        "height", int, "integer", pa.int32(), image_side, "must be a multiple of {m} from {m} to %d" % MAX_SIDE, lambda d, r: d.height,
        check_array=_image_sides,
    ),
    # Rescales guided noise predictions towards the text prediction's spread (Lin et al. 2023, as diffusers'
    # rescale_noise_cfg); v-prediction models (SD 2.x) are commonly run at 0.7.
    Column(
        "guidance_rescale", float, "number", pa.float64(), lambda v, m: unit_fraction(v), "must be a number from 0 to 1",
        lambda d, r: d.guidance_rescale, neutral=0.0,
    ),
    # How many images the row makes, each an output row of its own with an image_index and seed (image_seed).
    # Not in the key, each image's index is: raising it from 2 to 4 makes images 2 and 3 and keeps 0 and 1.
    Column(
        "images", int, "integer", None, lambda v, m: whole_number(v, 1, MAX_IMAGES), f"must be a whole number from 1 to {MAX_IMAGES}",
        lambda d, r: d.images, in_key=False, neutral=1, check_array=_whole_numbers(1, MAX_IMAGES), stored=False,
    ),
    # SDXL's micro-conditioning, with StableDiffusionXLPipeline's defaults: the row's own (height, width), no crop.
    Column(
        "original_size", tuple, "pair", pa.list_(pa.int32()), pixel_pair, f"must be [height, width], two whole numbers from 0 to {MAX_PAIR}",
        lambda d, r: (r["height"], r["width"]), families=("sdxl",), neutral=None,
    ),
    Column(
        "crops_coords_top_left", tuple, "pair", pa.list_(pa.int32()), pixel_pair, f"must be [top, left], two whole numbers from 0 to {MAX_PAIR}",
        lambda d, r: (0, 0), families=("sdxl",), neutral=None,
    ),
    Column(
        "target_size", tuple, "pair", pa.list_(pa.int32()), pixel_pair, f"must be [height, width], two whole numbers from 0 to {MAX_PAIR}",
        lambda d, r: (r["height"], r["width"]), families=("sdxl",), neutral=None,
    ),
    # diffusers' clip_skip (A1111's "Clip skip" is this plus 1); the model's own limit is checked when it is loaded.
    Column(
        "clip_skip", int, "integer", pa.int32(), lambda v, m: whole_number(v, 0, MAX_CLIP_SKIP),
        "must be a whole number from 0 (no layer skipped), below the text encoder's layer count",
        lambda d, r: d.clip_skip, neutral=0, check_array=_whole_numbers(0, MAX_CLIP_SKIP),
    ),
    # The row's LoRA set: the run's --lora, its own `loras` and its prompt's <lora:name:weight> tags, resolved against
    # the run and the row's prompt (nodes.dataset.ingest.RESOLVERS, not check and default). None where the run uses
    # no LoRA; () for a row without one in a run that does. Only content and weight enter the key, and only a
    # non-empty set: rows without LoRA keep the keys they had before.
    Column(
        "loras", tuple, "loras", LORAS_TYPE, lambda v, m: v, LORAS_RULE, neutral=None,
        key_value=_loras_key, written_value=_loras_written,
    ),
)
COLUMN_NAMES = tuple(c.name for c in COLUMNS)

# Columns that sdflow adds to each output row beside the table's own; an input column may not take one of these names.
# image_index (which of its row's images, from 0) follows `id` in the dataset: (id, image_index) is unique there.
RUN_COLUMNS = ("scheduler", "model")
OUTPUT_COLUMNS = ("image",) + COLUMN_NAMES + ("image_index",) + RUN_COLUMNS


def lora_set(row) -> tuple:
    """A row's LoRA set as batches share it: ((sha256, weight), ...); () for none."""
    return tuple((lora.sha256, lora.weight) for lora in row.loras or ())


def _shape_key(self) -> tuple:
    """Rows that share this key can share a batch: (width, height, steps, their LoRA set: lora_set)."""
    return (self.width, self.height, self.steps, lora_set(self))


def _slot(self) -> tuple[int, int]:
    """Which output row this is, unique in a run: (position, image_index). A table row making several images
    shares its position with them, so images, failures and encodings are keyed by this."""
    return (self.position, self.image_index)


# One image of a prompt-table row, with every generation parameter resolved: `position` (0-based, in the table),
# then one field per column of COLUMNS, then `image_index` (which of the row's `images`, from 0; its `seed` is
# image_seed of the row's). `id` is the row's id, or its position where the table has none. Columns of other
# families than the model's are None.
Row = make_dataclass(
    "Row",
    [("position", int)]
    + [(c.name, c.type) if c.neutral is REQUIRED else (c.name, c.type, field(default=c.neutral)) for c in COLUMNS]
    + [("image_index", int, field(default=0))],
    frozen=True,
    namespace={
        "shape_key": property(_shape_key), "slot": property(_slot),
        "__doc__": "One image of a prompt-table row, with every generation parameter resolved.",
    },
)
Row.__module__ = __name__  # so that rows pickle (pool workers receive them) as nodes.params.Row


IMAGE_FORMATS = ("png", "webp", "jpeg")  # what --image-format takes; png is the default
JPEG_QUALITY = 95  # --quality for JPEG when none is given: A1111's default, few visible artefacts, about 1/3 of PNG's size


@dataclass(frozen=True)
class ImageFormat:
    """How each image is stored: its file format and, for lossy encodings, their quality."""

    name: str = "png"  # png, webp or jpeg (IMAGE_FORMATS)
    quality: int | None = None  # 1 to 100 for JPEG and lossy WebP; None: PNG, or WebP lossless

    @property
    def lossless(self) -> bool:
        return self.name == "png" or (self.name == "webp" and self.quality is None)

    @property
    def key(self) -> str:
        """What it adds to a row's key: "" for PNG, so that PNG rows keep the keys they had before formats existed."""
        if self.name == "png":
            return ""
        return f"{self.name}:{'lossless' if self.quality is None else self.quality}"


def image_format(name: str, quality: int | None) -> ImageFormat | None:
    """The resolved --image-format and --quality, or None if they are not valid together (image_format_rule)."""
    if name not in IMAGE_FORMATS:
        return None
    if quality is not None and (name == "png" or whole_number(quality, 1, 100) is None):
        return None
    if name == "jpeg" and quality is None:
        quality = JPEG_QUALITY
    return ImageFormat(name, None if quality is None else int(quality))


def image_format_rule(name, quality) -> str:
    """Why image_format refused `name` and `quality`, in one sentence for the user."""
    if name not in IMAGE_FORMATS:
        return f"--image-format {name!r} is not one of: {', '.join(IMAGE_FORMATS)}."
    if name == "png":
        return f"--quality {quality!r} does not apply to png, which is lossless: leave it out, or choose webp or jpeg."
    return (
        f"--quality {quality!r} is not a whole number from 1 to 100; it sets {name}'s lossy quality"
        + (" (leave it out for lossless WebP)." if name == "webp" else f" (default {JPEG_QUALITY}).")
    )


@dataclass(frozen=True)
class RunConfig:
    """How a run generates, beyond each row's own parameters."""

    scheduler: str | None  # as asked: an sdflow sampler name, or None for the model's own
    sampler: str  # its resolved name, written to each row and image
    batch_size: int  # rows per U-Net batch
    batches_in_flight: int  # decoded batches that may wait for image encoding
    progress: bool  # show a progress bar on stderr
    storage_options: dict = field(hash=False)  # fsspec options; may hold credentials, never logged
    image: ImageFormat = ImageFormat()  # how images are stored; part of each row's key unless PNG
    stage_tasks: bool = False  # each stage of each batch a Prefect task run of its own (--stage-tasks)
    # This run (its flow run's id), in each marker it commits: its summary counts its own shards, not another
    # run's commit of the same rows that won the race to the marker.
    run_id: str = ""
    lanes: int = 1  # batches generated at once, each on its share of the CPU's threads (batch.cpu_lanes)
