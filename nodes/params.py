"""The parameters of a generation run: run-level defaults, and one resolved row of the prompt table."""

from __future__ import annotations

from dataclasses import dataclass, field

# Samplers by their sdflow name; each maps to a diffusers scheduler class and config overrides
# (see nodes.denoise.make_scheduler) and to the name AUTOMATIC1111's infotext uses for it.
SCHEDULER_NAMES = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc")

# Columns of the prompt table that sdflow reads; every other column is carried through untouched.
CONTROL_COLUMNS = ("id", "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height")

# Columns that sdflow adds to each output row; an input column may not take one of these names.
OUTPUT_COLUMNS = ("image",) + CONTROL_COLUMNS + ("scheduler", "model")

MAX_STEPS = 1000  # the training schedule's length: schedulers cannot take more inference steps
MAX_SIDE = 4096  # pixels; larger sides are refused as almost certainly a mistake in the table
MAX_SEED = 2**63 - 1  # seeds are stored as int64; torch.Generator.manual_seed accepts all of these


@dataclass(frozen=True)
class GenerationDefaults:
    """Run-level values; a row's own non-null column overrides each of them."""

    steps: int  # denoising steps
    guidance_scale: float  # classifier-free guidance scale; <= 1 turns guidance off, as in diffusers
    width: int  # image width in pixels, a multiple of the model's size multiple
    height: int  # image height in pixels, likewise
    negative_prompt: str  # what to steer away from; "" is the unconditional prompt
    seed: int  # run seed; rows without a seed get one derived from it and their id


@dataclass(frozen=True)
class Row:
    """One prompt-table row with every generation parameter resolved."""

    position: int  # 0-based row position in the prompt table
    id: int | str  # the row's `id`, or its position where the table has none
    prompt: str
    negative_prompt: str
    seed: int  # seed of the row's own torch.Generator("cpu")
    steps: int
    guidance_scale: float
    width: int
    height: int

    @property
    def shape_key(self) -> tuple[int, int, int]:
        """Rows that share this key can share a batch: (width, height, steps)."""
        return (self.width, self.height, self.steps)


@dataclass(frozen=True)
class RunConfig:
    """How a run generates, beyond each row's own parameters."""

    scheduler: str | None  # as asked: an sdflow scheduler name, or None for the model's own
    sampler: str  # its resolved name, written to each row and PNG
    batch_size: int  # rows per U-Net batch
    batches_in_flight: int  # decoded batches that may wait for PNG encoding
    progress: bool  # show a progress bar on stderr
    storage_options: dict = field(hash=False)  # fsspec options; may hold credentials, never logged
