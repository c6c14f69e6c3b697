"""Null-model feed: what sdflow's non-model path (prompts, latents, image encoding, Parquet and commit) sustains.

    python tests/bench/bench_feed.py --images 64            # 64 images at 512x512, 16 at 1024x1024, every format
    python tests/bench/bench_feed.py --images 32 --sizes 512 --formats png

A model whose U-Net and VAE cost next to nothing (channels of 8 and 4, no attention, 1 step) is built and saved in
diffusers format, loaded as any model is (inspect_model, load_components), and rows go through the engine
(generate_shard_images, with each stage timed), the flows' image encoding (store.encode_images on its pool, one
batch at a time submitted to a thread pool as Prefect's task runner does, at most batches-in-flight waiting) and
the shard commit (write_shard) into a local OUT. The null VAE's images are flat, which would compress unrealistically
well: photo-like pixels (tests/support/images.py) stand in for them after the decode, so encoding costs what a
photograph's does.

Prints, per size and format: images/s sustained (wall clock), and CPU seconds per image of each stage, as
time.thread_time() in the thread that ran it (torch runs on one thread here, so a stage's thread is all its CPU).
CPU figures hold on a busy machine; wall-clock figures do not. Then encode throughput with 1 and 2 threads (wall
clock), and whether Pillow releases the GIL while it compresses (a ratio of CPU times, beside two controls).
A script, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import zlib
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.support, as `python tests/bench/bench_feed.py` runs it

from nodes.dataset import store  # noqa: E402
from nodes.dataset.commit import write_shard
from nodes.dataset.store import batch_encoder, encode_image, encode_images, infotext, machine_cores, open_output
from nodes.params import Row, RunConfig, image_format
from nodes.pipeline.batch import Stages, generate_shard_images
from nodes.pipeline.components import inspect_model, load_components
from nodes.pipeline.decode import Decoded, decode_latents
from nodes.pipeline.denoise import denoise
from nodes.pipeline.encode import encode_prompts
from nodes.pipeline.latents import prepare_latents
from nodes.shapes.builders import SD_SCHEDULER_CONFIG, assemble_pipeline, clip_text_config, toy_tokenizer_files
from tests.support.images import photo_like

FORMATS = {"png": ("png", None), "webp": ("webp", None), "webp90": ("webp", 90), "jpeg95": ("jpeg", 95)}
PROMPT = "a photograph of a lighthouse on a rocky coast at dusk, dramatic clouds, 35mm, highly detailed"
NEGATIVE = "blurry, lowres, watermark"


def save_null_model(path: Path) -> Path:
    """A Stable Diffusion of almost no compute, in diffusers format: U-Net of 8 channels without attention, a VAE of
    4 blocks of 4 channels (latent side x 8 = image side) without mid-block attention, a one-layer CLIP."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vocab, merges = toy_tokenizer_files()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(clip_text_config(len(vocab), tokenizer, 32, 1, 2))
    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=(8, 8), layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2, mid_block_type=None, cross_attention_dim=32, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(4,) * 4, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=512, mid_block_add_attention=False,
    )
    scheduler = diffusers.DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    assemble_pipeline(tokenizer, text_encoder, unet, vae, scheduler).save_pretrained(path, safe_serialization=True)
    return path


class StageClock:
    """CPU seconds (thread time) per stage, summed over calls from any thread."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.lock = threading.Lock()

    def timed(self, name: str, fn):
        def wrapper(*args, **kwargs):
            started = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.seconds[name] += time.thread_time() - started

        return wrapper


def photo_decode(photos: list[np.ndarray], clock: StageClock):
    """decode_latents, timed, then photo-like pixels in place of the null VAE's flat images (not timed)."""
    timed = clock.timed("VAE decode", decode_latents)

    def decode(components, latents) -> Decoded:
        decoded = timed(components, latents)
        n = decoded.images.shape[0]
        return Decoded(torch.from_numpy(np.stack([photos[i % len(photos)] for i in range(n)])), decoded.non_finite)

    return decode


def run_feed(components, size: int, fmt: str, images: int, args, root: str) -> dict:
    """Generate `images` rows of one size into a fresh OUT as generate_shards does; wall seconds and CPU per stage."""
    image = image_format(*FORMATS[fmt])
    run = RunConfig("ddim", "ddim", args.batch_size, args.batches_in_flight, False, {}, image)
    rows = [Row(i, i, PROMPT, NEGATIVE, i, 1, 7.0, size, size) for i in range(images)]
    clock = StageClock()
    photos = [photo_like(size, seed=i) for i in range(4)]
    stages = Stages(
        clock.timed("prompt encoding", encode_prompts), clock.timed("latent init", prepare_latents),
        clock.timed("denoise", denoise), photo_decode(photos, clock),
    )
    original = store.encode_image
    store.encode_image = clock.timed(f"encode {fmt}", original)  # encode_images calls it on its pool's threads
    fs, out = open_output(root)
    tasks = ThreadPoolExecutor(max_workers=8)  # Prefect's thread-pool task runner, where the flow's write-shard runs
    encode = lambda done, pixels: batch_encoder().submit(encode_images, pixels, done, "ddim", "null", "0", image)  # noqa: E731
    commit = clock.timed("Parquet write + commit", write_shard)
    encoding, writing = deque(), deque()
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        for index, start in enumerate(range(0, images, args.shard_size)):
            shard_rows = rows[start : start + args.shard_size]
            encoded, failed = generate_shard_images(components, shard_rows, run, encode, encoding, stages=stages)
            keys = np.arange(start, start + len(shard_rows), dtype=np.uint64)
            carried = pa.table({"caption": [r.prompt for r in shard_rows]})
            writing.append(tasks.submit(
                lambda e=encoded, i=index, r=shard_rows, k=keys, c=carried: commit(
                    fs, out, i, r, k, [f.result() for f in e], c, "ddim", "null", [], {}
                )
            ))
            while len(writing) > 1:
                writing.popleft().result()
        for w in writing:
            w.result()
    finally:
        store.encode_image = original
        tasks.shutdown()
    return {"wall": time.perf_counter() - started, "cpu": time.process_time() - cpu_started, "stages": dict(clock.seconds)}


def encode_scaling(size: int, fmt: str, count: int, threads: int) -> tuple[float, float]:
    """Encode `count` photo-like images on `threads` threads: (images/s of wall clock, process CPU s per wall s)."""
    image = image_format(*FORMATS[fmt])
    photos = [photo_like(size, seed=i) for i in range(4)]
    row = Row(0, 0, PROMPT, NEGATIVE, 1, 30, 7.0, size, size)
    text = infotext(row, "ddim", "null", "0")
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda i: encode_image(photos[i % 4], text, image), range(threads)))  # warm the threads
        started, cpu_started = time.perf_counter(), time.process_time()
        list(pool.map(lambda i: encode_image(photos[i % 4], text, image), range(count)))
        wall = time.perf_counter() - started
    return count / wall, (time.process_time() - cpu_started) / wall


def python_share(work, repeats: int) -> float:
    """CPU seconds a pure-Python thread gets per CPU second of `work` running beside it in another thread.

    A ratio of CPU times, so it holds on a busy machine: about 1 when `work` releases the GIL (both threads run
    whenever the OS gives them a core), well under 1 when it holds it (the Python thread waits for it)."""
    done, cpu = threading.Event(), {}

    def run():
        started = time.thread_time()
        for _ in range(repeats):
            work()
        cpu["work"] = time.thread_time() - started
        done.set()

    thread = threading.Thread(target=run)
    started = time.thread_time()
    thread.start()
    while not done.is_set():
        pass
    spinner = time.thread_time() - started
    thread.join()
    return spinner / cpu["work"]


def gil_check(sizes: list[int], formats: list[str]) -> None:
    data, block = os.urandom(1 << 20) * 64, os.urandom(1 << 22)
    print("\nGIL: CPU s a pure-Python thread gets per CPU s of the work beside it (about 1: GIL released; well under 1: held)")
    print(f"| work | ratio |\n|---|---|\n| control, holds the GIL: bytes.count over 64 MB | {python_share(lambda: data.count(b'xyz'), 10):.2f} |")
    print(f"| control, releases the GIL: zlib.compress of 4 MB | {python_share(lambda: zlib.compress(block, 6), 10):.2f} |")
    row = Row(0, 0, PROMPT, NEGATIVE, 1, 30, 7.0, 512, 512)
    text = infotext(row, "ddim", "null", "0")
    for size in sizes:
        pixels = photo_like(size)
        for fmt in formats:
            image = image_format(*FORMATS[fmt])
            repeats = 40 if image.name == "jpeg" else 4
            print(f"| encode_image {fmt} {size}x{size} | {python_share(lambda: encode_image(pixels, text, image), repeats):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images at 512x512; a quarter as many at 1024x1024")
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches-in-flight", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--no-scaling", action="store_true", help="skip the 1- vs 2-thread encode measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)  # so that a stage's thread time is all its CPU
    sizes = [int(s) for s in args.sizes.split(",")]
    formats = args.formats.split(",")
    load = os.getloadavg()
    print(f"cores {machine_cores()} (encode pool {store.encoding_pool()._max_workers} threads), torch threads 1, "
          f"batch {args.batch_size}, {args.batches_in_flight} batches in flight, load average {load[0]:.1f} {load[1]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        model = save_null_model(Path(tmp) / "null-model")
        components = load_components(inspect_model(str(model)), torch.device("cpu"), torch.float32)
        for size in sizes:
            images = max(args.batch_size, args.images if size <= 512 else args.images // 4)
            run_feed(components, size, "png", args.batch_size, args, f"{tmp}/warm-{size}")  # first calls pay for setup
            results = {fmt: run_feed(components, size, fmt, images, args, f"{tmp}/out-{size}-{fmt}") for fmt in formats}
            print(f"\n{size}x{size}, {images} images, 1 step, CFG 7: CPU ms per image per stage (thread time)")
            names = ["prompt encoding", "latent init", "denoise", "VAE decode"]
            print("| format | " + " | ".join(names) + " | image encoding | Parquet write + commit | non-model CPU ms | images/s per core (non-model) | images/s wall | process CPU s / wall s |")
            print("|---" * (len(names) + 7) + "|")
            for fmt, r in results.items():
                per = {k: 1000 * v / images for k, v in r["stages"].items()}
                non_model = per["prompt encoding"] + per["latent init"] + per[f"encode {fmt}"] + per["Parquet write + commit"]
                cells = [f"{per[n]:.1f}" for n in names] + [f"{per[f'encode {fmt}']:.1f}", f"{per['Parquet write + commit']:.1f}"]
                print(f"| {fmt} | " + " | ".join(cells) + f" | {non_model:.1f} | {1000 / non_model:.1f} | "
                      f"{images / r['wall']:.2f} | {r['cpu'] / r['wall']:.2f} |")
        if not args.no_scaling:
            print("\nencode throughput, photo-like images, encode_image on a thread pool (wall clock: noisy on a busy machine)")
            print("| size | format | 1 thread img/s | 2 threads img/s | speed-up | CPU/wall, 1 thread | CPU/wall, 2 threads |")
            print("|---|---|---|---|---|---|---|")
            for size in sizes:
                count = 16 if size <= 512 else 4
                for fmt in formats:
                    one = [encode_scaling(size, fmt, count, 1) for _ in range(3)]
                    two = [encode_scaling(size, fmt, count, 2) for _ in range(3)]
                    r1, r2 = statistics.median(x[0] for x in one), statistics.median(x[0] for x in two)
                    u1, u2 = statistics.median(x[1] for x in one), statistics.median(x[1] for x in two)
                    print(f"| {size} | {fmt} | {r1:.1f} | {r2:.1f} | {r2 / r1:.2f} | {u1:.2f} | {u2:.2f} |")
            gil_check(sizes, formats)
    load = os.getloadavg()
    print(f"\nload average at the end {load[0]:.1f} {load[1]:.1f}")


if __name__ == "__main__":
    main()
