"""Baseline for the throughput benchmark: the script a competent user would write by hand with diffusers.

    python tests/bench/baseline_diffusers.py MODEL PROMPTS.parquet OUT_DIR [--steps N] [--guidance G]
        [--batch-size B] [--scheduler NAME] [--device D] [--dtype T] [--compile] [--timings FILE]

Loads `StableDiffusionPipeline` from a diffusers-format folder (safetensors, no safety checker), reads the
Parquet prompt table (`prompt` and `seed` columns; `id` if present), and for each batch of B rows calls the
pipeline with one seeded CPU generator per row. Each image is saved as a PNG in OUT_DIR/images/, and at the
end OUT_DIR/images.parquet holds id, prompt, seed and the PNG bytes. --device and --dtype place the pipeline as
sdflow's options of those names do; --compile compiles the U-Net and the VAE decoder as sdflow's --compile does
(nn.Module.compile). With --timings, writes a JSON record of where the time went (imports, model load,
generation, writing).

Deliberately independent of sdflow (it imports neither Prefect nor sdflow's modules), so its start-up is
what a plain diffusers script costs.
"""

from __future__ import annotations

import time

_t0 = time.perf_counter()
_started_at = time.time()

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import diffusers  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

# The same diffusers scheduler class and config overrides for each name as sdflow (nodes/params.py
# SAMPLERS); copied rather than imported, so this script does not import Prefect. The benchmark checks
# that the two tables agree.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("prompts")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--scheduler", help="an sdflow scheduler name; default: the model's own")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net and the VAE decoder")
    parser.add_argument("--timings", help="write a JSON record of timings to this file")
    args = parser.parse_args()
    imported = time.perf_counter()

    pipe = StableDiffusionPipeline.from_pretrained(
        args.model,
        safety_checker=None,
        requires_safety_checker=False,
        use_safetensors=True,
        torch_dtype=getattr(torch, args.dtype),
    ).to(args.device)
    if args.compile:
        pipe.unet.compile()
        pipe.vae.decoder.compile()
    if args.scheduler:
        cls, overrides = SCHEDULERS[args.scheduler]
        pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()

    table = pq.read_table(args.prompts)
    prompts = table.column("prompt").to_pylist()
    seeds = table.column("seed").to_pylist()
    ids = table.column("id").to_pylist() if "id" in table.column_names else list(range(len(prompts)))

    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    pngs: list[bytes] = []
    for start in range(0, len(prompts), args.batch_size):
        batch = slice(start, start + args.batch_size)
        generator = [torch.Generator("cpu").manual_seed(seed) for seed in seeds[batch]]
        images = pipe(
            prompts[batch],
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=generator,
        ).images
        for row_id, image in zip(ids[batch], images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data = buffer.getvalue()
            (out / "images" / f"{row_id}.png").write_bytes(data)
            pngs.append(data)
    generated = time.perf_counter()

    result = pa.table(
        {
            "id": pa.array(ids),
            "prompt": pa.array(prompts, pa.string()),
            "seed": pa.array(seeds, pa.int64()),
            "image": pa.array(pngs, pa.binary()),
        }
    )
    pq.write_table(result, out / "images.parquet")
    finished = time.perf_counter()

    if args.timings:
        record = {
            "import_seconds": round(imported - _t0, 3),
            "model_load_seconds": round(loaded - imported, 3),
            "generation_seconds": round(finished - loaded, 3),  # generation, PNGs and the Parquet file
            "write_seconds": round(finished - generated, 3),
            "seconds": round(finished - _t0, 3),
            "started_at": _started_at,  # epoch seconds: the script's first line ...
            "finished_at": _started_at + (finished - _t0),  # ... and its last file written
            "images": len(pngs),
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
            "dtype": args.dtype,
            "scheduler": type(pipe.scheduler).__name__,
            "pid": os.getpid(),
        }
        Path(args.timings).write_text(json.dumps(record, indent=2) + "\n")
    print(f"baseline: wrote {len(pngs)} images to {out} in {finished - _t0:.1f} s")


if __name__ == "__main__":
    main()
