"""Planning a large prompt table: wall time and peak memory of `plan_prompt_table`, fresh and on resume.

    python tests/bench/bench_planning.py [--rows 1000000] [--row-group 131072] [--done 900000]
        [--rows-per-shard 256] [--profile STAGE] [--keep DIR] [--stages plan,resume,...] [--s3-rows 100000]

Writes a prompt table of `--rows` rows (id int64, prompt, seed int64, and a carried `caption` text column;
Parquet, snappy, row groups of `--row-group` rows) to a temporary folder, then measures, each stage in a
fresh Python process so that one stage's memory cannot hide another's:

  plan            plan_prompt_table(url, defaults, size_multiple=8, rows_per_shard, identity=("euler", "fp"))
  stream          every shard of that plan through iter_shard_rows, which is what generation reads
                  (its row keys are saved, to make the next stage's done keys)
  plan-resume     plan_prompt_table(..., done_keys=<keys of the first --done rows>), as a resumed run plans
  scan-control    pyarrow alone: iter_batches over the control columns of open_prompt_table's file, no Python
                  per row (a floor for `plan`)
  scan-all        the same over every column (what decoding the carried columns during planning would add)
  resume          a rerun against an OUT holding every row of the table committed (markers and the index written
                  directly, without images: shards of --rows-per-shard, as `sdflow generate` leaves them): read_committed
                  (the index, then markers it does not name), plan_prompt_table with those done keys, and the manifest
                  finalize would write (build_manifest, JSON)
  resume-markers  the same OUT with its index moved aside: read_committed parses every marker (an OUT written before
                  indexes, or whose index is not trusted)
  resume-s3       `resume` against moto's S3 server on loopback (tests/support/s3_server.py): a table of --s3-rows rows
                  and an OUT with all of them committed, both on S3

For each: wall seconds, rows/s, and peak RSS above the stage's own baseline (the process after imports and
setup, e.g. with the done keys loaded). Peak RSS is the kernel's high-water mark (VmHWM, reset through
/proc/self/clear_refs just before the stage where the kernel allows it, else ru_maxrss), so it includes
Arrow's buffers, NumPy arrays and Python objects alike; Arrow's own pool peak is shown beside it.
`--profile STAGE` runs that stage once more under cProfile and prints the top functions by cumulative time.

A standalone script, not a test: it asserts nothing about speed. On a shared machine figures are noisy.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pickle
import pstats
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

S3_BUCKET = "sdflow-bench"
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))  # nodes, also when the package is not installed

STAGES = ("plan", "stream", "plan-resume", "scan-control", "scan-all", "resume", "resume-markers", "resume-s3")
COLOURS = "red green blue yellow orange purple pink white black gray brown cyan magenta".split()
SHAPES = "circle square triangle star cat dog house tree car boat".split()
PLACES = "left right top bottom centre middle".split()
STYLES = ["a photo of", "a drawing of", "a picture of", "an image of", "a small", "a large"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows in the prompt table (default: 1000000)")
    p.add_argument("--row-group", type=int, default=131_072, help="rows per Parquet row group (default: 131072)")
    p.add_argument("--done", type=int, default=900_000, help="rows already done for plan-resume (default: 900000)")
    p.add_argument("--rows-per-shard", type=int, default=256, help="rows per output shard (default: 256)")
    p.add_argument("--profile", choices=STAGES, help="also run this stage under cProfile and print where time goes")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary folder)")
    p.add_argument("--stages", default="plan,stream,plan-resume,scan-control,scan-all,resume,resume-s3",
                   help="comma-separated stages to run, in this order (default: all but resume-markers)")
    p.add_argument("--s3-rows", type=int, default=100_000, help="rows of the table and OUT on S3 for resume-s3 (default: 100000)")
    # Internal: run one stage in this process and print its figures as one JSON line.
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--table", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--keys", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cprofile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------ the table


def write_prompt_table(path: Path, rows: int, row_group: int) -> None:
    """id, prompt, seed and a carried caption, written one row group at a time."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    schema = pa.schema([("id", pa.int64()), ("prompt", pa.string()), ("seed", pa.int64()), ("caption", pa.string())])
    with pq.ParquetWriter(path, schema, compression="snappy") as writer:
        for start in range(0, rows, row_group):
            n = min(row_group, rows - start)
            prompts = [
                f"{rng.choice(STYLES)} a {rng.choice(COLOURS)} {rng.choice(SHAPES)} at the {rng.choice(PLACES)}, "
                f"{rng.choice(COLOURS)} background, variation {start + i}"
                for i in range(n)
            ]
            captions = [f"source batch {(start + i) // 1000}, annotator {rng.randrange(50)}" for i in range(n)]
            table = pa.table(
                {
                    "id": np.arange(start, start + n, dtype=np.int64),
                    "prompt": prompts,
                    "seed": np.arange(start, start + n, dtype=np.int64) * 7919 % (2**31),
                    "caption": captions,
                },
                schema=schema,
            )
            writer.write_table(table, row_group_size=row_group)


# ------------------------------------------------------------------ a committed OUT, without images


def table_keys(url: str, options: dict, storage_options: dict | None = None):
    """Every row's key, as planning computes them (key_rows over the control columns)."""
    import numpy as np

    from nodes.dataset.ingest import SCAN_ROWS, _open_versioned, iter_row_chunks, key_rows
    from nodes.params import COLUMN_NAMES

    pf, _ = _open_versioned(url, storage_options)
    control = [c for c in COLUMN_NAMES if c in pf.schema_arrow.names]
    parts = [key_rows(chunk, start, options["defaults"], options["size_multiple"], options["identity"])[1]
             for start, chunk in iter_row_chunks(pf, SCAN_ROWS, columns=control, url=url)]
    return np.concatenate(parts)


def write_committed(fs, root: str, keys, rows_per_shard: int) -> int:
    """Markers of shards of `rows_per_shard` rows holding `keys` (ids and seeds as in write_prompt_table, PNG hashes
    made up), then the index a finished run leaves; no data files. Returns the number of markers."""
    import uuid

    from nodes.dataset.commit import Committed, MARKER_FILE, MARKERS, _listed, index_stamp, marker_path, write_index

    fs.makedirs(f"{root}/{MARKERS}", exist_ok=True)
    fs.makedirs(f"{root}/_index", exist_ok=True)
    shards, batch = [], {}
    for index, first in enumerate(range(0, len(keys), rows_per_shard)):
        part = keys[first : first + rows_per_shard].tolist()
        ids = list(range(first, first + len(part)))
        marker = {
            "shard": index, "file": f"data/part-{index:05d}-{uuid.uuid4().hex}.parquet", "rows": len(part),
            "keys": [f"{k:016x}" for k in part], "ids": ids, "seeds": [i * 7919 % 2**31 for i in ids],
            "sha256": [f"{k:016x}" * 4 for k in part], "failed": [], "worker": "bench", "seconds": 1.0,
        }
        batch[marker_path(root, index)] = (json.dumps(marker, indent=1) + "\n").encode()
        shards.append({"shard": index, "file": marker["file"], "rows": len(part)})
        if len(batch) >= 256:
            fs.pipe(batch)
            batch = {}
    if batch:
        fs.pipe(batch)
    listed = _listed(fs, root, MARKERS, MARKER_FILE)
    stamps = tuple(index_stamp(listed[s["shard"]][1]) for s in shards)
    import numpy as np

    committed = Committed(tuple(shards), np.sort(keys), (), stamps, None, len(shards))
    write_index(fs, root, committed)
    return len(shards)


# ------------------------------------------------------------------ one stage, in its own process


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_kb(resettable: bool) -> int:
    if resettable:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def run_stage(args) -> dict:
    import numpy as np
    import pyarrow as pa
    
    from nodes.dataset.ingest import iter_shard_rows, open_prompt_table, plan_prompt_table
    from nodes.params import COLUMN_NAMES, GenerationDefaults

    url = str(args.table)
    defaults = GenerationDefaults(steps=20, guidance_scale=7.5, width=512, height=512, negative_prompt="", seed=0)
    options = dict(defaults=defaults, size_multiple=8, rows_per_shard=args.rows_per_shard, identity=("euler", "fp"))
    done = np.load(args.keys) if args.stage == "plan-resume" else None
    fs = root = None
    if args.stage.startswith("resume"):
        import fsspec

        from nodes.dataset.commit import read_committed
        from nodes.dataset.manifest import build_manifest

        storage_options = {"endpoint_url": args.endpoint} if args.endpoint else None
        fs, root = fsspec.core.url_to_fs(args.out, **(storage_options or {}))
        if args.stage == "resume-s3":
            url = f"s3://{S3_BUCKET}/prompts.parquet"
            options["storage_options"] = storage_options
    saved_plan = args.keys.with_name("plan.pickle")
    plan = pickle.loads(saved_plan.read_bytes()) if args.stage == "stream" else None  # made by the plan stage
    keys = np.full(plan.rows_to_generate, 0, np.uint64) if plan is not None else None  # allocated before the baseline
    pool = pa.default_memory_pool()
    pool.release_unused()

    result: dict = {"stage": args.stage}
    profiler = cProfile.Profile() if args.cprofile else None
    baseline = rss_kb()
    resettable = reset_peak()
    if not resettable:
        result["note"] = f"VmHWM not resettable: peak is the process's ru_maxrss, baseline was already {peak_kb(False)} KiB"
    pool_before = pool.max_memory()
    started = time.perf_counter()
    if profiler:
        profiler.enable()

    if args.stage.startswith("resume"):
        committed = read_committed(fs, root)
        read_seconds = time.perf_counter() - started
        p = plan_prompt_table(url, **options, done_keys=committed.keys, first_shard=committed.next_index)
        info = SimpleNamespace(ref="bench", family="sd", vae=None, fingerprint="fp")
        manifest = build_manifest({}, defaults, info, "cpu", "float32", p, committed, [], {})
        text = json.dumps(manifest, indent=2, default=str)
        rows = p.num_rows
        result.update(
            read_committed_seconds=round(read_seconds, 3), committed_rows=len(committed.keys),
            markers_read=committed.markers_read, index=committed.index, already_done=p.already_done,
            rows_to_generate=p.rows_to_generate, manifest_mib=round(len(text) / 2**20, 2),
            manifest_shards=len(manifest["shards"]),
        )
    elif args.stage in ("plan", "plan-resume"):
        p = plan_prompt_table(url, **options, done_keys=done)
        rows = p.num_rows
        result.update(shards=len(p.shards), rows_to_generate=p.rows_to_generate, already_done=p.already_done)
    elif args.stage == "stream":
        rows = filled = 0
        for _, shard_rows, carried, shard_keys in iter_shard_rows(plan, defaults, 8):
            keys[filled : filled + len(shard_keys)] = shard_keys
            filled += len(shard_keys)
            rows += len(shard_rows)
        result.update(shards=len(plan.shards), rows_streamed=rows)
    else:
        pf = open_prompt_table(url)  # through fsspec, as planning reads it (a local path read directly buffers more)
        columns = [c for c in COLUMN_NAMES if c in pf.schema_arrow.names] if args.stage == "scan-control" else None
        rows = sum(b.num_rows for b in pf.iter_batches(batch_size=65_536, columns=columns))

    seconds = time.perf_counter() - started
    if profiler:
        profiler.disable()
    peak = peak_kb(resettable)
    result.update(
        rows=rows,
        seconds=round(seconds, 3),
        rows_per_second=round(rows / seconds),
        baseline_rss_mib=round(baseline / 1024, 1),
        peak_rss_above_baseline_mib=round((peak - baseline) / 1024, 1),
        arrow_pool_peak_mib=round(max(pool.max_memory() - pool_before, 0) / 2**20, 1) if pool.max_memory() else None,
    )
    if args.stage == "plan":
        saved_plan.write_bytes(pickle.dumps(p))
    if args.stage == "stream":
        np.save(args.keys, keys)
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
        result["profile"] = text.getvalue()
    return result


def child(stage: str, args, table: Path, keys: Path, profile: bool = False, out: str = "", endpoint: str = "") -> dict:
    cmd = [sys.executable, __file__, "--stage", stage, "--table", str(table), "--keys", str(keys),
           "--rows-per-shard", str(args.rows_per_shard), "--out", out or str(keys.parent / "out")]
    if endpoint:
        cmd += ["--endpoint", endpoint]
    if profile:
        cmd.append("--cprofile")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"stage {stage} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the whole benchmark


def bench_options(args) -> dict:
    from nodes.params import GenerationDefaults

    defaults = GenerationDefaults(steps=20, guidance_scale=7.5, width=512, height=512, negative_prompt="", seed=0)
    return dict(defaults=defaults, size_multiple=8, rows_per_shard=args.rows_per_shard, identity=("euler", "fp"))


def resume_on_s3(args, work: Path, keys: Path) -> dict:
    """The resume stage against moto's S3 server on loopback, with --s3-rows rows: table and OUT both on S3."""
    sys.path.insert(0, str(REPO))
    import s3fs

    from tests.support.s3_server import FAKE_AWS_ENV, MotoS3Server

    os.environ.update(FAKE_AWS_ENV)
    table = work / "prompts-s3.parquet"
    write_prompt_table(table, args.s3_rows, args.row_group)
    with MotoS3Server() as server:
        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint_url, skip_instance_cache=True)
        fs.mkdir(S3_BUCKET)
        fs.put_file(str(table), f"{S3_BUCKET}/prompts.parquet")
        started = time.perf_counter()
        markers = write_committed(fs, f"{S3_BUCKET}/out", table_keys(str(table), bench_options(args)), args.rows_per_shard)
        print(f"committed OUT on S3: {args.s3_rows:,} rows in {markers:,} markers and an index, written in "
              f"{time.perf_counter() - started:.1f} s")
        return child("resume-s3", args, table, keys, out=f"s3://{S3_BUCKET}/out", endpoint=server.endpoint_url)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.stage:
        print(json.dumps(run_stage(args)))
        return
    import numpy as np
    import pyarrow as pa

    work = args.keep or Path(tempfile.mkdtemp(prefix="sdflow-bench-planning-"))
    work.mkdir(parents=True, exist_ok=True)
    table, keys = work / "prompts.parquet", work / "keys.npy"
    command = " ".join(["python", "tests/bench/bench_planning.py", *(argv if argv is not None else sys.argv[1:])])
    try:
        started = time.perf_counter()
        write_prompt_table(table, args.rows, args.row_group)
        size = table.stat().st_size
        print(f"command: {command}")
        print(
            f"table: {args.rows:,} rows (id, prompt, seed, caption), row groups of {args.row_group:,}, "
            f"{size / 2**20:.1f} MiB, written in {time.perf_counter() - started:.1f} s"
        )
        print(f"python {sys.version.split()[0]}, pyarrow {pa.__version__}, numpy {np.__version__}, {os.cpu_count()} CPU(s); "
              f"load average {os.getloadavg()[0]:.2f} at start")
        stages = args.stages.split(",")
        results = {}
        for stage in ("plan", "stream"):
            if stage in stages:
                results[stage] = child(stage, args, table, keys)
        if "plan-resume" in stages:
            all_keys = np.load(keys) if keys.exists() else table_keys(str(table), bench_options(args))
            np.save(keys, all_keys[: args.done])
            results["plan-resume"] = child("plan-resume", args, table, keys)
        for stage in ("scan-control", "scan-all"):
            if stage in stages:
                results[stage] = child(stage, args, table, keys)
        if "resume" in stages or "resume-markers" in stages:
            import fsspec

            started = time.perf_counter()
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            markers = write_committed(fsspec.filesystem("file"), str(out), table_keys(str(table), bench_options(args)), args.rows_per_shard)
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            print(f"committed OUT: {args.rows:,} rows in {markers:,} markers and an index, {size / 2**20:.0f} MiB, "
                  f"written in {time.perf_counter() - started:.1f} s")
            if "resume" in stages:
                results["resume"] = child("resume", args, table, keys)
            if "resume-markers" in stages:
                index = work / "index-aside"
                shutil.rmtree(index, ignore_errors=True)
                (out / "_index").rename(index)
                results["resume-markers"] = child("resume-markers", args, table, keys)
                index.rename(out / "_index")
        if "resume-s3" in stages:
            results["resume-s3"] = resume_on_s3(args, work, keys)

        print()
        print(f"{'stage':<14} {'seconds':>8} {'rows/s':>10} {'baseline RSS':>13} {'peak RSS above':>15} {'Arrow pool peak':>16}  result")
        for stage, r in results.items():
            detail = {
                "plan": f"{r.get('shards', 0):,} shards, {r.get('rows_to_generate', 0):,} rows to generate",
                "plan-resume": f"{r.get('already_done', 0):,} rows done, {r.get('rows_to_generate', 0):,} to generate, {r.get('shards', 0):,} shards",
                "stream": f"{r.get('rows_streamed', 0):,} rows in {r.get('shards', 0):,} shards",
            }.get(stage, f"{r['rows']:,} rows decoded")
            if stage.startswith("resume"):
                detail = (f"read_committed {r['read_committed_seconds']:.2f} s ({r['committed_rows']:,} keys, "
                          f"{r['markers_read']:,} markers parsed, index {r['index']}); {r['already_done']:,} rows done, "
                          f"{r['rows_to_generate']:,} to generate; manifest {r['manifest_mib']} MiB ({r['manifest_shards']:,} shards)")
            pool = "n/a" if r["arrow_pool_peak_mib"] is None else f"{r['arrow_pool_peak_mib']:.1f} MiB"
            print(
                f"{stage:<14} {r['seconds']:>8.2f} {r['rows_per_second']:>10,} {r['baseline_rss_mib']:>9.1f} MiB "
                f"{r['peak_rss_above_baseline_mib']:>11.1f} MiB {pool:>16}  {detail}"
            )
            if "note" in r:
                print(f"{'':<14} note: {r['note']}")
        print(f"load average {os.getloadavg()[0]:.2f} at end")
        for stage, r in results.items():
            print(f"{stage}: peak RSS {r['baseline_rss_mib'] + r['peak_rss_above_baseline_mib']:.0f} MiB in all")
        if args.profile:
            r = child(args.profile, args, table, keys, profile=True)
            print(f"\ncProfile of {args.profile} ({r['seconds']:.2f} s under the profiler), top 25 by cumulative time:")
            print(r["profile"])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
