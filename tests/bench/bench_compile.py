"""--compile on CPU: first-run compile time, a second run with the cache, per-image time compiled and not.

    python tests/bench/bench_compile.py                    # the tests' toy model (64x64), batches 4, 4, 3, 4, 4
    python tests/bench/bench_compile.py --size medium --steps 10

Each run is a fresh process (as `sdflow generate` is) loading the model through load_components, then batches
through the engine (generate_batch); the compiled runs share one fresh cache folder (SDFLOW_CACHE), so the first
pays for compiling and the second finds the compiled code. Prints wall and CPU seconds (the process and the
compiler processes it started) of the first batch, of the batch of 3 (a second shape) and of the whole run, the
steady per-image time (the batches after it), how many graphs Dynamo compiled, and the largest uint8 difference
from the uncompiled images. A script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BATCHES = (4, 4, 3, 4, 4)  # a partial batch in the middle: a second shape, as a shard's last batch makes


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_phase(args) -> None:
    """In a child process: load (compiled or not), generate the batches, write images and timings."""
    import torch

    from nodes.params import Row
    from nodes.pipeline.batch import generate_batch
    from nodes.pipeline.components import inspect_model, load_components

    started, cpu_started = time.perf_counter(), time.process_time() + children_cpu()
    components = load_components(inspect_model(args.model), torch.device("cpu"), torch.float32, compile=args.phase != "eager")
    batches, images, position = [], [], 0
    for size in BATCHES:
        rows = [Row(position + i, position + i, "a red circle on a blue background", "blurry", 1000 + position + i,
                    args.steps, 7.0, args.side, args.side) for i in range(size)]
        position += size
        t, c = time.perf_counter(), time.process_time() + children_cpu()
        out = list(generate_batch(components, "ddim", rows, {}))
        batches.append({"rows": size, "wall": time.perf_counter() - t, "cpu": time.process_time() + children_cpu() - c})
        images += [img.numpy() for _, imgs in out for img in imgs]
    np.save(args.images, np.stack(images))
    from torch._dynamo.utils import counters

    record = {"batches": batches, "wall": time.perf_counter() - started,
              "cpu": time.process_time() + children_cpu() - cpu_started,
              "graphs": counters["stats"]["unique_graphs"]}
    Path(args.record).write_text(json.dumps(record))


def phase(name: str, model: str, cache: str, work: str, args) -> dict:
    env = {**os.environ, "SDFLOW_CACHE": cache}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    record, images = f"{work}/{name}.json", f"{work}/{name}.npy"
    cpu = children_cpu()
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--phase", name, "--model", model, "--record", record, "--images", images,
         "--steps", str(args.steps), "--side", str(args.side)],
        env=env, check=True,
    )
    result = json.loads(Path(record).read_text())
    result["process_wall"], result["process_cpu"] = time.perf_counter() - started, children_cpu() - cpu
    result["images"] = np.load(images)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["small", "medium"], default="small")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    parser.add_argument("--side", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return run_phase(args)
    from nodes.shapes.builders import ToyModelConfig, save_toy_model

    config = ToyModelConfig() if args.size == "small" else ToyModelConfig(unet_channels=(128, 256), vae_channels=(64, 128))
    print(f"toy model {args.size}, {args.steps} steps, CFG, batches {BATCHES}, {args.side}x{args.side}, "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as work:
        model = str(save_toy_model(f"{work}/model", config))
        cache = f"{work}/cache"
        runs = {name: phase(name, model, cache, work, args) for name in ("eager", "compiled-cold", "compiled-warm")}
    print("| run | process wall s | process CPU s | first batch wall s | first batch CPU s | batch of 3, CPU s | steady CPU ms/image | steady wall ms/image | graphs | max level diff vs eager |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    eager = runs["eager"]["images"]
    for name, r in runs.items():
        steady = r["batches"][3:]  # after the batch of 3, which compiles the dynamic-batch graph
        n = sum(b["rows"] for b in steady)
        diff = int(np.abs(r["images"].astype(np.int16) - eager.astype(np.int16)).max())
        first = r["batches"][0]
        print(f"| {name} | {r['process_wall']:.1f} | {r['process_cpu']:.1f} | {first['wall']:.1f} | {first['cpu']:.1f} | {r['batches'][2]['cpu']:.1f} | "
              f"{1000 * sum(b['cpu'] for b in steady) / n:.0f} | {1000 * sum(b['wall'] for b in steady) / n:.0f} | "
              f"{r['graphs']} | {diff} |")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
