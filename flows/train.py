"""The training flow: a small Stable Diffusion trained from scratch on the shapes domain, component by component.

Reads top to bottom like the recipe: tokenizer -> CLIP (its text tower becomes the frozen text encoder) -> VAE and
its latent scaling factor -> U-Net on the VAE's latents -> the folder in diffusers format. Run it with
`python -m flows.train OUT_DIR [--preset full|tiny] [--seed N]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from nodes.dataset.manifest import software_versions
from nodes.pipeline.batch import torch_threads
from nodes.shapes import train
from nodes.errors import SdflowError
from nodes.shapes.train import ClipSpec, UnetSpec, VaeSpec


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; the same config and seed give the same weights on the same machine."""

    seed: int = 0  # initial weights and every step's batch, noise and timesteps derive from it
    clip: ClipSpec = field(default_factory=ClipSpec)  # CLIP sizes and training (see nodes.shapes.train.ClipSpec)
    vae: VaeSpec = field(default_factory=VaeSpec)  # VAE sizes and training (see nodes.shapes.train.VaeSpec)
    unet: UnetSpec = field(default_factory=UnetSpec)  # U-Net sizes and training (see nodes.shapes.train.UnetSpec)
    distinct_batches: int = 0  # 0: a fresh batch every step; N > 0: every component cycles through N fixed batches
    # The sampler saved with the model. Not PNDM, which stable-diffusion-v1-5 ships: measured on the full model
    # (bench_quality), PNDM at 20 steps and guidance 7.5 gets the colour of half the images wrong (it is right
    # at 50 steps, and at guidance 1), where DPM++ 2M at 20 steps gets them all right.
    scheduler: str = "DPMSolverMultistepScheduler"
    default_steps: int = 20  # denoising steps written to sdflow.json (the model's default)
    default_guidance: float = 7.5  # guidance scale written to sdflow.json
    log_every: int = 100  # log each component's mean loss every this many steps
    threads: int | None = None  # torch intra-op threads for the run; None keeps torch's default (one per core)


# The real run: the specs' defaults. Sized on this project's 2-core AMD EPYC machine (torch's default 2 threads)
# from the median step of 30-60 calibration steps per component, measured while the machine was otherwise idle:
# CLIP 0.21 s/step at batch 128 -> 1500 steps ~5 min; VAE 0.18 s/step at batch 16 -> 3000 steps ~9 min;
# U-Net 0.48 s/step at batch 32 -> 5000 steps ~40 min. About 55 minutes in all, plus start-up and saving.
FULL = TrainConfig()
# A few steps at toy widths, for CI: each component overfits one fixed batch, so its loss falls on any seed.
TINY = TrainConfig(
    clip=ClipSpec(text_width=32, text_layers=1, vision_width=32, vision_layers=1, heads=2, projection_dim=32,
                  steps=12, batch_size=16, learning_rate=3e-3, warmup_steps=0),
    vae=VaeSpec(channels=(16, 16, 16), steps=12, batch_size=4, learning_rate=3e-3, warmup_steps=0, scale_samples=16),
    unet=UnetSpec(channels=(16, 32, 32), attention_heads=2, steps=12, batch_size=4, learning_rate=3e-3,
                  warmup_steps=0, ema_decay=0.5),
    distinct_batches=1,
    default_steps=4,
    log_every=4,
    threads=1,  # its ops are too small to share out, and two threads crawl (5-10x) on a busy 2-core machine
)
PRESETS = {"full": FULL, "tiny": TINY}


def preset_config(preset: str, seed: int) -> TrainConfig:
    if preset not in PRESETS:
        raise SdflowError(f"--preset {preset!r} is not one of: {', '.join(PRESETS)}.")
    return dataclasses.replace(PRESETS[preset], seed=seed)


def check_output(out: str) -> Path:
    """The output folder as a Path, refused before any training if it already holds anything."""
    path = Path(out).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise SdflowError(f"output folder {out} already exists and is not empty; name a new folder.")
    return path


def loss_logger(component: str, every: int):
    """A step callback that logs the mean loss and seconds per step of the last `every` steps to the run's log."""
    logger = get_run_logger()
    window: list[float] = []
    started = [time.perf_counter()]

    def on_step(step: int, loss: float) -> None:
        window.append(loss)
        if len(window) == every:
            now = time.perf_counter()
            logger.info(
                "%s step %d: loss %.4f (%.3f s/step)", component, step + 1, sum(window) / every, (now - started[0]) / every
            )
            window.clear()
            started[0] = now

    return on_step


TASK_OPTIONS = {"cache_policy": NO_CACHE, "persist_result": False}  # models pass between tasks in memory


@task(name="build-tokenizer", **TASK_OPTIONS)
def build_tokenizer_task():
    """The CLIP tokenizer over the domain's words."""
    return train.build_tokenizer()


@task(name="train-clip", **TASK_OPTIONS)
def train_clip_task(config: TrainConfig, tokenizer):
    """CLIP trained contrastively; returns (CLIPModel, its text tower as a CLIPTextModel, losses)."""
    clip, losses = train.train_clip(
        config.clip, tokenizer, config.seed, config.distinct_batches, loss_logger("clip", config.log_every)
    )
    return clip, train.clip_text_encoder(clip), losses


@task(name="train-vae", **TASK_OPTIONS)
def train_vae_task(config: TrainConfig):
    """The VAE trained to reconstruct; returns (AutoencoderKL, losses)."""
    return train.train_vae(config.vae, config.seed, config.distinct_batches, loss_logger("vae", config.log_every))


@task(name="measure-scaling-factor", **TASK_OPTIONS)
def measure_scaling_factor_task(config: TrainConfig, vae) -> float:
    """1 / std of the VAE's latents, written into its config (`scaling_factor`) for the U-Net and the pipeline."""
    scaling_factor = train.measure_scaling_factor(vae, config.vae.scale_samples, config.seed)
    vae.register_to_config(scaling_factor=scaling_factor)
    get_run_logger().info("vae scaling factor %.5f", scaling_factor)
    return scaling_factor


@task(name="train-unet", **TASK_OPTIONS)
def train_unet_task(config: TrainConfig, tokenizer, text_encoder, vae):
    """The U-Net trained for noise prediction on the VAE's latents; returns (its EMA, losses)."""
    return train.train_unet(
        config.unet, tokenizer, text_encoder, vae, config.seed, config.distinct_batches, loss_logger("unet", config.log_every)
    )


@task(name="save-model", **TASK_OPTIONS)
def save_model_task(path: Path, config: TrainConfig, tokenizer, text_encoder, vae, unet, clip, record: dict) -> str:
    """Write the folder next to its final place, then rename it there: a half-written model is never found."""
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    defaults = {"steps": config.default_steps, "guidance_scale": config.default_guidance}
    train.save_model(partial, tokenizer, text_encoder, vae, unet, clip, config.scheduler, defaults, record)
    if path.exists():
        path.rmdir()  # empty: check_output saw to that
    partial.rename(path)
    return str(path)


@flow(name="train-model")
def train_model(out: str, preset: str = "full", seed: int = 0) -> dict:
    """Train a toy Stable Diffusion on the shapes domain with the `preset` config and `seed`; save it at `out`.

    Returns the training record: the config, seconds, parameter counts and sizes, the measured scaling factor,
    software versions and each component's per-step losses (`out/train.json` keeps the same, with losses averaged per `log_every`).
    """
    config = preset_config(preset, seed)
    path = check_output(out)
    seconds: dict[str, float] = {}

    def timed(name, fn, *args):
        started = time.perf_counter()
        result = fn(*args)
        seconds[name] = round(time.perf_counter() - started, 3)
        return result

    with torch_threads(config.threads):  # tasks run inline, on this thread
        tokenizer = timed("tokenizer", build_tokenizer_task)
        clip, text_encoder, clip_losses = timed("clip", train_clip_task, config, tokenizer)
        vae, vae_losses = timed("vae", train_vae_task, config)
        scaling_factor = timed("scaling_factor", measure_scaling_factor_task, config, vae)
        unet, unet_losses = timed("unet", train_unet_task, config, tokenizer, text_encoder, vae)

    modules = {"clip": clip, "text_encoder": text_encoder, "vae": vae, "unet": unet}
    record = {
        "preset": preset,
        "config": dataclasses.asdict(config),
        "scaling_factor": scaling_factor,
        "seconds": seconds,
        "parameters": {name: train.parameter_count(m) for name, m in modules.items()},
        "megabytes": {name: round(train.megabytes(m), 3) for name, m in modules.items()},
        "versions": software_versions(),
    }
    losses = {"clip": clip_losses, "vae": vae_losses, "unet": unet_losses}
    curves = {name: train.loss_curve(values, config.log_every) for name, values in losses.items()}
    saved = save_model_task(path, config, tokenizer, text_encoder, vae, unet, clip, {**record, "loss_curves": curves})
    return {"out": saved, **record, "losses": losses}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.train", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="new folder for the trained model (diffusers format)")
    parser.add_argument("--preset", default="full", choices=sorted(PRESETS), help="full: ~1 hour on 2 CPU cores; tiny: seconds, for tests")
    parser.add_argument("--seed", type=int, default=0, help="run seed (default: 0)")
    args = parser.parse_args(argv)
    try:
        record = train_model(out=args.out, preset=args.preset, seed=args.seed)
    except SdflowError as e:
        print(f"python -m flows.train: error: {e}", file=sys.stderr)
        return 2
    parts = ", ".join(f"{name} {s:.0f} s" for name, s in record["seconds"].items())
    print(f"trained {args.preset} model saved to {record['out']} ({parts}; scaling factor {record['scaling_factor']:.4f}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
