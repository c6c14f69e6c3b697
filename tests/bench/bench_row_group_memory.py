"""Peak memory of planning then streaming a table of one 100 MB row group with a carried binary column (no model).

    python tests/bench/bench_row_group_memory.py 100000   # 1,000 values of 100 KB: one data page per row group
    python tests/bench/bench_row_group_memory.py 1000     # 100,000 values of 1 KB: many pages

Prints the peak RSS above the process's baseline after imports, and the peak of pyarrow's memory pool.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nodes.dataset.ingest import iter_shard_rows, plan_prompt_table
from nodes.params import GenerationDefaults


def rss_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_table(path: str, value_bytes: int) -> None:
    n = 100_000_000 // value_bytes
    rng = np.random.default_rng(0)
    blobs = pa.array([rng.bytes(value_bytes) for _ in range(n)], pa.binary())  # incompressible
    pq.write_table(pa.table({"id": np.arange(n), "prompt": ["a cat"] * n, "blob": blobs}), path, row_group_size=n)


def main(value_bytes: int) -> None:
    path = os.path.join(tempfile.gettempdir(), f"sdflow-bench-row-group-{value_bytes}.parquet")
    if not os.path.exists(path):  # written once, then measured in a fresh process: building it is not part of the peak
        write_table(path, value_bytes)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    base = rss_mib()
    defaults = GenerationDefaults(steps=20, guidance_scale=7.5, width=64, height=64, negative_prompt="", seed=0)
    plan = plan_prompt_table(path, defaults, 8, 256)
    rows = sum(len(r) for _, r, _, _ in iter_shard_rows(plan, defaults, 8))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pool = pa.default_memory_pool().max_memory() / 2**20
    print(
        f"{os.path.getsize(path) / 2**20:.0f} MiB, 1 row group, {rows} rows of {value_bytes} B: "
        f"peak RSS {peak - base:.0f} MiB above baseline, pyarrow pool peak {pool:.0f} MiB"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
