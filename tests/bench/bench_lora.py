"""Per-row LoRA at table scale: a 1,000-row table with 10 distinct LoRA sets, against the same rows without LoRA.

    python tests/bench/bench_lora.py [--rows 1000] [--sets 10] [--steps 2] [--batch-size 25] [--shard-size 250]

Writes four random LoRAs for the toy model `sdflow:tiny-random` (two in diffusers/PEFT format, two in kohya's) and a
prompt table whose rows cycle through `--sets` LoRA sets (one to three LoRAs at various weights), interleaved row by
row, the worst order for switching. Runs `sdflow generate` on it (its own temporary Prefect server, in this process),
then on the same rows with the `loras` column left out, and prints for each: wall seconds, images/s, and the adapter
loads and switches the manifest records. A standalone script, not a test: on a shared machine figures are noisy.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--sets", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--shard-size", type=int, default=250)
    args = parser.parse_args()

    import pyarrow as pa

    from flows.cli import main as sdflow
    from nodes.params import LORAS_TYPE
    from nodes.pipeline.components import builtin_model_path
    from tests.support.loras import lora_layers, save_kohya_lora, save_peft_lora
    from tests.support.tables import write_table

    root = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    model = builtin_model_path("sdflow:tiny-random")
    names = ["ink", "neon", "paper", "wood"]
    for seed, name in enumerate(names):
        save = save_peft_lora if seed % 2 == 0 else save_kohya_lora
        save(root / "loras" / f"{name}.safetensors", lora_layers(model, "sd", seed=seed), "sd")
    combos = [c for k in (1, 2, 3) for c in itertools.combinations(names, k)]
    sets = [[{"name": n, "weight": round(0.3 + 0.1 * ((i + j) % 7), 2)} for j, n in enumerate(combos[i % len(combos)])] for i in range(args.sets)]
    rows = [{"id": i, "prompt": f"a shape number {i}", "loras": sets[i % args.sets]} for i in range(args.rows)]
    schema = pa.schema([("id", pa.int64()), ("prompt", pa.string()), ("loras", LORAS_TYPE)])
    with_loras = write_table(root / "with.parquet", rows, schema)
    without = write_table(root / "without.parquet", [{"id": r["id"], "prompt": r["prompt"]} for r in rows])
    common = ["--model", "sdflow:tiny-random", "--steps", args.steps, "--batch-size", args.batch_size,
              "--shard-size", args.shard_size, "--scheduler", "euler", "--device", "cpu"]
    results = {}
    for label, table, extra in (("no LoRA", without, []), (f"{args.sets} LoRA sets", with_loras, ["--lora-dir", root / "loras"])):
        out = root / label.replace(" ", "-")
        started = time.perf_counter()
        code = sdflow(["generate", table, str(out), *map(str, common + extra)])
        wall = time.perf_counter() - started
        assert code == 0, code
        manifest = json.loads((out / "manifest.json").read_text())
        results[label] = (wall, manifest)
    print(f"\n{args.rows} rows, {args.sets} distinct LoRA sets of {len(names)} files, {args.steps} steps, batch {args.batch_size}, shards of {args.shard_size}")
    print(f"{'':>16} | {'wall s':>7} | {'generation s':>12} | {'images/s':>8} | {'loads':>5} | {'switches':>8}")
    for label, (wall, m) in results.items():
        t, a = m["timings"], m["adapters"]
        print(f"{label:>16} | {wall:7.1f} | {t['generation_seconds']:12.1f} | {t['images_per_second']:8.2f} | {a['loads']:5d} | {a['switches']:8d}")


if __name__ == "__main__":
    main()
