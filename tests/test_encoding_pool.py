"""A batch's images are encoded on the shared pool, one thread per core, with the bytes and the row order of one
image after another."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from nodes.dataset import store
from nodes.dataset.store import encode_image, encode_images, encoding_pool, infotext, machine_cores
from nodes.params import ImageFormat, Row, image_format
from tests.support.images import photo_like

FORMATS = [("png", None), ("webp", None), ("webp", 90), ("jpeg", None)]


def batch(n: int = 6, size: int = 96) -> tuple[np.ndarray, list[Row]]:
    """n different photo-like images, and rows whose positions are not in batch order (as after a failed row)."""
    pixels = np.stack([photo_like(size, seed=i) for i in range(n)])
    positions = [7, 2, 11, 0, 5, 9][:n]
    rows = [Row(p, f"r{p}", f"prompt {p}", "", p, 20, 7.5, size, size) for p in positions]
    return pixels, rows


@pytest.mark.parametrize("name,quality", FORMATS)
def test_parallel_encoding_gives_the_serial_bytes_in_row_order(name, quality):
    pixels, rows = batch()
    image = image_format(name, quality)
    encoded = encode_images(pixels, rows, "euler", "m", "1", image)
    assert list(encoded) == [r.slot for r in rows]
    for i, row in enumerate(rows):
        assert encoded[row.slot] == encode_image(pixels[i], infotext(row, "euler", "m", "1"), image)


def test_images_are_encoded_on_the_pool_threads_not_the_callers(monkeypatch):
    threads = []

    def recording(*args):
        threads.append(threading.current_thread().name)
        return encode_image(*args)

    monkeypatch.setattr(store, "encode_image", recording)
    pixels, rows = batch()
    encode_images(pixels, rows, "euler", "m", "1", ImageFormat())
    assert len(threads) == len(rows)
    assert all(name.startswith("sdflow-encode") for name in threads)
    assert encoding_pool()._max_workers == machine_cores()
