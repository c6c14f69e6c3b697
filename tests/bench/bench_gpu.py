"""The GPU benchmark, made to run in one short call on a lent GPU machine: sdflow against diffusers' own pipeline.

    python tests/bench/bench_gpu.py --out DIR [--budget SECONDS]     # on the GPU machine (see tests/bench/README.md)
    python tests/bench/bench_gpu.py --out DIR --tiny                  # here, on the CPU: the same path on a toy model

Builds SD 1.5's architecture with random weights (sdflow's shipped configs and CLIP tokenizer, float16 safetensors;
nothing downloaded), writes prompt tables with a seed column, then runs stages in order of importance, each
both sides as their own processes on the same rows (tests/bench/bench_throughput.py's machinery):

  - float16 and bfloat16, batches 16, 8 and 32, 512x512, 30 steps, DDIM, guidance 7.5: `sdflow generate
    --device cuda --dtype D --batch-size B` against tests/bench/baseline_diffusers.py (StableDiffusionPipeline,
    the same seeds, PNGs written as it goes);
  - the null-model feed (tests/bench/bench_feed.py) with this machine's cores: what sdflow's non-model path
    sustains at 512 and 1024 pixels for each image format;
  - --compile on both sides at float16, batch 16 (a cold compile), then sdflow's again with its cache warm.

Per stage it prints and records images/s of the generation loop (model loaded to last file written) and of the
whole process, the ratio sdflow/diffusers, and the largest uint8 difference between the two sides' images of each
row. A stage that fails is recorded with its log's tail and the next one runs; a stage that would not finish
inside --budget is skipped. Results go to DIR/results.json and DIR/results.md after every stage, so a call cut
short still returns what it measured. A script, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_throughput as bt  # noqa: E402  (also puts the repository on sys.path and sets the offline environment)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-bench", help="results folder (default: $OUT)")
    p.add_argument("--budget", type=float, default=480, help="seconds this script may take; later stages are skipped (default: 480)")
    p.add_argument("--tiny", action="store_true", help="the toy model on the CPU, 2 steps: checks the path, measures nothing")
    p.add_argument("--steps", type=int, help="denoising steps (default: 30; --tiny: 2)")
    p.add_argument("--batches", type=int, default=4, help="batches per stage (default: 4)")
    p.add_argument("--skip", default="", help="comma-separated stage names to skip (e.g. compile,feed)")
    return p.parse_args(argv)


def stages(tiny: bool) -> list[dict]:
    """In order of importance: what the README's GPU figures need first comes first."""
    dtypes = ("float32", "bfloat16") if tiny else ("float16", "bfloat16")
    batches = (2, 4) if tiny else (16, 8, 32)
    plain = [{"name": f"{d}-b{b}", "dtype": d, "batch": b} for d in dtypes for b in batches]
    first = [s for s in plain if s["batch"] == batches[0]]
    rest = [s for s in plain if s["batch"] != batches[0]]
    compiled = {"dtype": dtypes[0], "batch": batches[0], "compile": True}
    return first + rest + [
        {"name": "feed"},
        {**compiled, "name": f"compile-{dtypes[0]}-b{batches[0]}"},
        {**compiled, "name": f"compile-warm-{dtypes[0]}-b{batches[0]}", "only": "sdflow"},
    ]


def environment(device: str) -> dict:
    import diffusers
    import prefect
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "prefect": prefect.__version__,
        "cpus": os.cpu_count(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def run_pair(stage: dict, base: argparse.Namespace, env: dict, work: Path, model: Path, rows: int) -> dict:
    """Both sides (or one) on one table; returns the stage's figures."""
    args = argparse.Namespace(**{**vars(base), "batch_size": stage["batch"], "dtype": stage["dtype"],
                                 "compile": stage.get("compile", False)})
    table = work / f"rows-{rows}.parquet"
    if not table.exists():
        bt.write_prompt_table(table, rows, args.seed)
    result = {}
    sides = [stage["only"]] if "only" in stage else ["baseline", "sdflow"]
    for side in sides:
        run = bt.run_side(side, args, env, work, model, table, stage["name"], steps=args.steps)
        result[side] = {
            "images": run.images,
            "wall_s": round(run.wall, 2),
            "gen_s": round(run.gen, 2),
            "load_s": round(run.load, 2),
            "images_per_s": round(run.images / run.gen, 3),  # the generation loop
            "whole_images_per_s": round(run.rate, 3),  # process start to exit
            "cpu_s": round(run.cpu, 1),
        }
    if len(sides) == 2:
        result["ratio"] = round(result["sdflow"]["images_per_s"] / result["baseline"]["images_per_s"], 3)
        result["whole_ratio"] = round(result["sdflow"]["whole_images_per_s"] / result["baseline"]["whole_images_per_s"], 3)
        result["images"] = bt.compare_images(work / "out" / f"sdflow-{stage['name']}", work / "out" / f"baseline-{stage['name']}")
    return result


def run_feed(work: Path, tiny: bool) -> dict:
    cmd = [sys.executable, str(HERE / "bench_feed.py"), "--images", "8" if tiny else "128", "--batch-size", "8"]
    if tiny:
        cmd += ["--sizes", "512", "--formats", "png", "--no-scaling"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=bt.REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    (work / "logs" / "feed.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"bench_feed.py exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    return {"report": done.stdout}


def write_results(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# GPU benchmark ({record['model']}, {record['steps']} steps, guidance 7.5, DDIM)", "",
             "```", json.dumps(record["environment"]), "```", "",
             "| stage | diffusers img/s | sdflow img/s | ratio | whole process (diffusers, sdflow, ratio) | images |",
             "|---|---|---|---|---|---|"]
    for name, r in record["stages"].items():
        if "error" in r or "skipped" in r or name == "feed":
            continue
        b, s = r.get("baseline"), r.get("sdflow")
        lines.append(
            f"| {name} | {b['images_per_s'] if b else '-'} | {s['images_per_s']} | {r.get('ratio', '-')} | "
            f"{b['whole_images_per_s'] if b else '-'}, {s['whole_images_per_s']}, {r.get('whole_ratio', '-')} | "
            f"{r.get('images', '')} |"
        )
    for name, r in record["stages"].items():
        if "error" in r or "skipped" in r:
            lines += ["", f"{name}: " + (f"skipped ({r['skipped']})" if "skipped" in r else "FAILED"), "```",
                      r.get("error", ""), "```"]
    if "report" in record["stages"].get("feed", {}):
        lines += ["", "## Null-model feed", "```", record["stages"]["feed"]["report"], "```"]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out).resolve()
    device = "cpu" if args.tiny else "cuda"
    steps = args.steps or (2 if args.tiny else 30)
    work = Path(tempfile.mkdtemp(prefix="sdflow-gpu-bench-"))
    (work / "logs").mkdir()
    (work / "out").mkdir()
    env = {**os.environ, **bt.COMMON_ENV, "PREFECT_HOME": str(work / "prefect-home"), "SDFLOW_CACHE": str(work / "cache")}
    base = argparse.Namespace(sdflow_command=f"{sys.executable} -m flows.cli", guidance=7.5, shard_size=256, seed=0,
                              scheduler="ddim", device=device, steps=steps)
    record = {"environment": environment(device), "steps": steps, "stages": {}}
    print(json.dumps(record["environment"]), flush=True)
    try:
        t = time.perf_counter()
        setup = bt.build_model(work / "model", "small" if args.tiny else "sd15", steps, 7.5, device)
        record["model"] = f"{'toy' if args.tiny else 'SD 1.5 architecture, random weights'}, " \
                          f"{sum(setup['params'].values()) / 1e6:.0f} M parameters, {setup['image_side']}px"
        record["model_build_s"] = round(time.perf_counter() - t, 1)
        print(f"model: {record['model']} ({record['model_build_s']} s)", flush=True)
        warm = {"name": "warmup", "dtype": stages(args.tiny)[0]["dtype"], "batch": 1}
        run_pair(warm, argparse.Namespace(**{**vars(base), "steps": 1}), env, work, work / "model", 1)
        seconds_per_image = None  # measured by the first stage; sizes the budget checks of the rest
        for stage in stages(args.tiny):
            name = stage["name"]
            if any(skip and skip in name for skip in args.skip.split(",")):
                continue
            rows = (stage.get("batch") or 0) * args.batches
            left = args.budget - (time.perf_counter() - started)
            need = 60 if name == "feed" else 240 if stage.get("compile") and "warm" not in name else \
                30 + 2 * rows * (seconds_per_image or 0.3)
            if need > left:
                record["stages"][name] = {"skipped": f"needs about {need:.0f} s, {left:.0f} s of the budget left"}
                print(f"{name}: skipped, {record['stages'][name]['skipped']}", flush=True)
                continue
            print(f"{name} ...", flush=True)
            t = time.perf_counter()
            try:
                record["stages"][name] = run_feed(work, args.tiny) if name == "feed" else \
                    run_pair(stage, base, env, work, work / "model", rows)
            except (Exception, SystemExit) as e:  # run_side exits with the failed side's log tail
                record["stages"][name] = {"error": f"{type(e).__name__}: {e}"[-4000:] + "\n" + traceback.format_exc()[-1500:]}
            record["stages"][name]["stage_s"] = round(time.perf_counter() - t, 1)
            if seconds_per_image is None and "baseline" in record["stages"][name]:
                seconds_per_image = record["stages"][name]["stage_s"] / (2 * rows)
            print(json.dumps(record["stages"][name])[:2000], flush=True)
            write_results(out, record)
    finally:
        record["total_s"] = round(time.perf_counter() - started, 1)
        write_results(out, record)
        bt.stop_kept_server(env["PREFECT_HOME"])
        shutil.rmtree(work, ignore_errors=True)
    print((out / "results.md").read_text())
    return 1 if any("error" in r for r in record["stages"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
