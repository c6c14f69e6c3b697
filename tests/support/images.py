"""Test images with the statistics of photographs, for encoders: no photo ships with the project or its packages."""

from __future__ import annotations

import numpy as np


def photo_like(size: int = 512, seed: int = 0) -> np.ndarray:
    """An (size, size, 3) uint8 image with natural-image statistics: a 1/f^1.4 amplitude spectrum (scale-invariant
    structure, from broad regions to fine texture, as photographs have), colour channels mostly shared
    (luminance) with weaker chroma, and a little sensor grain. The exponent is chosen so that it compresses as a
    512x512 photograph does (PNG about 14 bits per pixel, JPEG 95 about a quarter of that); uniform noise would not."""
    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    amplitude = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / size) ** 1.4

    def field() -> np.ndarray:
        spectrum = amplitude * np.exp(2j * np.pi * rng.random((size, size)))
        values = np.fft.ifft2(spectrum).real
        return (values - values.mean()) / values.std()

    luminance = field()
    channels = np.stack([luminance + 0.35 * field() for _ in range(3)], axis=-1)
    image = 128 + 45 * channels + rng.normal(0, 1.5, (size, size, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)
