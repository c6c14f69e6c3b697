"""Encode time and size per image for each --image-format, on a 512x512 photo-like image (tests/support/images.py).

    python tests/bench/bench_formats.py [--size 512] [--repeats 20]

One thread, Pillow as sdflow calls it (nodes.dataset.store.encode_image) with a typical infotext; prints the median
encode time, the size and the PSNR against the pixels for each format. A script, not a test.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import PIL
from PIL import Image

from nodes.dataset.store import encode_image, infotext
from nodes.params import Row, image_format
from tests.support.images import photo_like

FORMATS = [("png", None), ("webp", None), ("webp", 90), ("webp", 80), ("jpeg", None), ("jpeg", 90), ("jpeg", 80)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    pixels = photo_like(args.size)
    prompt = "a photograph of a lighthouse on a rocky coast at dusk, dramatic clouds, 35mm, highly detailed"
    row = Row(0, 0, prompt, "blurry, lowres, watermark", 1234, 30, 7.0, args.size, args.size)
    text = infotext(row, "dpmpp_2m_karras", "stabilityai/stable-diffusion-2-1", "0.1")
    print(f"Pillow {PIL.__version__}, {args.size}x{args.size}, median of {args.repeats}, one thread")
    print("| format | --quality | encode ms | KB per image | PSNR dB |")
    print("|---|---|---|---|---|")
    for name, quality in FORMATS:
        fmt = image_format(name, quality)
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            data = encode_image(pixels, text, fmt)
            times.append(time.perf_counter() - started)
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        shown = "- (lossless)" if fmt.lossless else f"{fmt.quality}{' (default)' if quality is None else ''}"
        milliseconds = 1000 * statistics.median(times)
        print(f"| {name} | {shown} | {milliseconds:.1f} | {len(data) / 1024:.0f} | {psnr(decoded, pixels):.1f} |")


if __name__ == "__main__":
    main()
