"""--compile: torch.compile of the U-Net and VAE decoder gives the uncompiled images within 1 uint8 level, keeps its
compiled code in SDFLOW_CACHE, and batches of another size do not recompile endlessly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nodes.params import Row
from nodes.pipeline.batch import generate_batch
from nodes.pipeline.components import inspect_model, load_components
from tests.support.reference import max_level_difference
from tests.support.runs import run_cli


def images(components, sizes: tuple[int, ...]) -> np.ndarray:
    out, position = [], 0
    for size in sizes:
        rows = [Row(position + i, position + i, "a red circle", "blurry", 7 + position + i, 3, 7.5, 64, 64) for i in range(size)]
        position += size
        out += [img.numpy() for _, batch in generate_batch(components, "ddim", rows, {}) for img in batch]
    return np.stack(out)


@pytest.mark.slow
def test_compiled_images_match_uncompiled_and_the_code_is_cached(tiny_model, tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("SDFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset")  # recorded, so that what compile sets is undone after
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", True)
    info = inspect_model(tiny_model)
    sizes = (2, 2, 1, 2, 1)  # a second batch size, and back: compiled once more, not each time
    eager = images(load_components(info, torch.device("cpu"), torch.float32), sizes)
    torch._dynamo.reset()
    counters.clear()
    compiled = load_components(info, torch.device("cpu"), torch.float32, compile=True)
    assert max_level_difference(images(compiled, sizes), eager) <= 1
    assert counters["stats"]["unique_graphs"] <= 4  # U-Net and decoder, static then dynamic batch
    assert any((tmp_path / "cache" / "torch-compile").rglob("*.py")), "inductor's code lands in SDFLOW_CACHE"
    torch._dynamo.reset()


def test_compile_with_a_pool_is_refused_before_anything_loads(capsys, tmp_path):
    table = tmp_path / "p.parquet"
    table.write_bytes(b"")
    code, err = run_cli(capsys, table, tmp_path / "out", "--compile", "--pool", "gpus")
    assert code == 2 and "--compile applies to generation in this process" in err
    assert not (tmp_path / "out").exists()
