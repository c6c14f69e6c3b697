"""Whole-process throughput: `sdflow generate` against a hand-written diffusers script, same model and workload.

    python tests/bench/bench_throughput.py [--rows N] [--batch-size B] [--steps S] [--size small|medium]
        [--scheduler NAME] [--guidance G] [--repeats R] [--threads T] [--keep] ...

Builds a toy Stable Diffusion with nodes.shapes.builders (random weights, nothing downloaded), writes a Parquet
prompt table of N rows with an `id`, `prompt` and `seed` column, then runs, each as its own process with
the same environment:
  (a) `sdflow generate TABLE OUT --model M --steps S --guidance G --batch-size B ...`
  (b) tests/bench/baseline_diffusers.py, StableDiffusionPipeline over the same table, same batches and seeds.
Each is timed from process start to exit (wall clock); the table shows seconds and images/s, and the ratio
sdflow/baseline (>= 1 means sdflow is at least as fast). Where time went inside each process comes from
sdflow's manifest.json timings and the baseline's own timings record.

A standalone script, not a test: it asserts nothing about speed. Timings on a shared CPU machine are
noisy: use --repeats and read the median, and compare runs made at the same time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BASELINE = HERE / "baseline_diffusers.py"
sys.path.insert(0, str(REPO))  # nodes.shapes.builders, also when the package is not installed

# Model sizes. `medium` makes the U-Net the dominant cost (its width and depth grow; text encoder and VAE
# stay small), so that the comparison is about the generation loop rather than Python overheads.
SIZES = {
    "small": {},  # ToyModelConfig() defaults: 1.7 M parameters (U-Net 1.0 M), 64x64 images
    # 24.8 M parameters (U-Net 24.0 M), 64x64 images: about 5x the small model's CPU time per image
    "medium": {"unet_channels": (64, 128, 256), "layers_per_block": 2, "text_width": 64, "sample_size": 32},
}
# Full-size architectures with random weights, from the family configs sdflow ships (nodes/pipeline/configs): the
# GPU benchmark's models. 1.07 G parameters for sd15 (U-Net 860 M), 512x512 images.
FAMILIES = {"sd15": "sd1"}

# The environment of both processes (and of this one): offline, quiet. sdflow's CLI sets the last two itself.
COMMON_ENV = {
    "HF_HUB_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}
os.environ.update(COMMON_ENV)

COLOURS = "red green blue yellow orange purple pink white black gray brown cyan magenta".split()
SHAPES = "circle square triangle star cat dog house tree car boat".split()
PLACES = "left right top bottom centre middle".split()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=160, help="prompt-table rows = images per run (default: 160)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call / U-Net batch (default: 8)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps (default: 10)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: 7.5)")
    p.add_argument("--scheduler", default="ddim", help="sdflow scheduler name, or 'model' for the model's own (default: ddim)")
    p.add_argument("--size", choices=sorted(SIZES) + sorted(FAMILIES), default="medium",
                   help="toy model size, or sd15: SD 1.5's architecture with random weights (default: medium)")
    p.add_argument("--device", help="--device for both sides, e.g. cuda (default: each side's own: cpu here)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="--dtype for both sides")
    p.add_argument("--compile", action="store_true", help="--compile for both sides (torch.compile of U-Net and VAE decoder)")
    p.add_argument("--shard-size", type=int, default=256, help="sdflow --shard-size (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="first row seed; row i gets seed + i (default: 0)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each side, alternating order (default: 1)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both processes (default: torch's own choice)")
    p.add_argument("--sdflow-command", help="run this instead of `sdflow` (e.g. 'python my_cli.py'), to try a change")
    p.add_argument("--only", choices=["sdflow", "baseline"], help="run one side only")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed 1-row run of each side first")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for both (repeatable)")
    p.add_argument("--prefect-home", help="PREFECT_HOME for sdflow (default: a fresh folder in the work dir)")
    p.add_argument("--workdir", help="where model, tables and outputs go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (model, outputs, logs)")
    p.add_argument("--no-compare", action="store_true", help="skip comparing the two sides' images")
    args = p.parse_args(argv)
    if args.scheduler == "model":
        args.scheduler = None
    return args


# --- setup ----------------------------------------------------------------------------------------------


def build_model(path: Path, size: str, steps: int, guidance: float, device: str | None = None) -> dict:
    """Save the toy model; returns a description of it (parameters per component, image size)."""
    from nodes.shapes.builders import ToyModelConfig, save_toy_model

    if size in FAMILIES:
        config = save_random_family_model(path, FAMILIES[size], device or "cpu")
    else:
        config = ToyModelConfig(**SIZES[size])
        save_toy_model(path, config, defaults={"steps": steps, "guidance_scale": guidance})
    params = {}
    from safetensors import safe_open

    for weights in sorted(path.glob("*/*.safetensors")):
        with safe_open(str(weights), framework="pt") as f:
            total = 0
            for name in f.keys():
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                total += n
        params[weights.parent.name] = total
    vae = json.loads((path / "vae" / "config.json").read_text())
    sample = json.loads((path / "unet" / "config.json").read_text())["sample_size"]
    side = sample * 2 ** (len(vae["block_out_channels"]) - 1)
    return {"config": config, "params": params, "image_side": side}


def save_random_family_model(path: Path, kind: str, device: str) -> str:
    """A diffusers folder of the family's architecture (sdflow's shipped configs and CLIP tokenizer) with random
    weights, initialised on `device` (seconds on a GPU) and saved in float16, as most checkpoints are shared."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from nodes.pipeline.checkpoint import shipped_config

    configs = shipped_config(kind, None, Path(tempfile.mkdtemp(prefix="sdflow-configs-")))
    scheduler_config = json.loads((configs / "scheduler" / "scheduler_config.json").read_text())
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # made in float16, as saved: no cast afterwards
    try:
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
            text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
    finally:
        torch.set_default_dtype(default_dtype)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(configs / "tokenizer"),
        unet=unet,
        scheduler=getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to("cpu").save_pretrained(path, safe_serialization=True)  # safetensors writes from host memory
    shutil.rmtree(configs.parent.parent, ignore_errors=True)
    return f"{kind} architecture, random weights"


def write_prompt_table(path: Path, rows: int, first_seed: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(1234)
    prompts = [
        f"a {rng.choice(['small', 'large', 'tiny', 'big'])} {rng.choice(COLOURS)} {rng.choice(SHAPES)} "
        f"at the {rng.choice(PLACES)} on a plain {rng.choice(COLOURS)} background"
        for _ in range(rows)
    ]
    table = pa.table(
        {
            "id": pa.array(range(rows), pa.int64()),
            "prompt": pa.array(prompts, pa.string()),
            "seed": pa.array([first_seed + i for i in range(rows)], pa.int64()),
        }
    )
    pq.write_table(table, path)


def check_scheduler_tables() -> str | None:
    """The baseline's copy of SCHEDULERS must be sdflow's; returns a warning if they differ."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_diffusers", BASELINE)
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)  # imports diffusers and torch, as this process has already
    try:
        from nodes.params import SAMPLERS
    except Exception as e:  # sdflow's modules are being edited by others: do not fail the benchmark on it
        return f"could not import nodes.params to compare samplers ({type(e).__name__}: {e})"
    if baseline.SCHEDULERS != {name: (s.scheduler, s.overrides) for name, s in SAMPLERS.items()}:
        return "baseline_diffusers.SCHEDULERS differs from nodes.params.SAMPLERS: the two sides may not use the same scheduler"
    return None


# --- running --------------------------------------------------------------------------------------------


@dataclass
class Run:
    side: str
    repeat: int
    wall: float  # process start to exit
    cpu: float  # user + system seconds of the process and the children it waited for (Prefect's server)
    images: int
    load: float  # model load, as the process measured it
    gen: float  # the generation loop: after the model load to the last output file written
    before: float  # process start to the generation loop: interpreter, imports, Prefect server and flow run, load
    after: float  # last output file written to process exit: manifest, Prefect teardown, interpreter exit
    inner: dict = field(default_factory=dict)  # the process's own timings record
    load_avg: float = 0.0  # the machine's 1-minute load average when the run started

    @property
    def rate(self) -> float:
        return self.images / self.wall


def run_process(cmd: list[str], env: dict, log: Path) -> tuple[float, float, float, float, int]:
    """Run to completion; returns (launch epoch, exit epoch, wall seconds, CPU seconds, return code)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "wb") as out:
        launched = time.time()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        code = proc.wait()
        wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return launched, launched + wall, wall, cpu, code


def sdflow_command(args, model: Path, table: Path, out: Path, steps: int) -> list[str]:
    if args.sdflow_command:
        cmd = shlex.split(args.sdflow_command)
    else:
        exe = Path(sys.executable).with_name("sdflow")
        cmd = [str(exe) if exe.exists() else (shutil.which("sdflow") or "sdflow")]
    cmd += ["generate", str(table), str(out)]
    cmd += ["--model", str(model), "--steps", str(steps), "--guidance", str(args.guidance)]
    cmd += ["--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size), "--seed", str(args.seed)]
    return cmd + placement_options(args)


def placement_options(args) -> list[str]:
    """The options both sides take alike: scheduler, device, dtype, compile."""
    cmd = ["--scheduler", args.scheduler] if args.scheduler else []
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--dtype", args.dtype] if args.dtype else []
    return cmd + (["--compile"] if args.compile else [])


def baseline_command(args, model: Path, table: Path, out: Path, steps: int, timings: Path) -> list[str]:
    cmd = [sys.executable, str(BASELINE), str(model), str(table), str(out)]
    cmd += ["--steps", str(steps), "--guidance", str(args.guidance), "--batch-size", str(args.batch_size)]
    cmd += ["--timings", str(timings)]
    return cmd + placement_options(args)


def run_side(side: str, args, env, work: Path, model: Path, table: Path, tag: str, steps: int) -> Run:
    out = work / "out" / f"{side}-{tag}"
    if out.exists():
        shutil.rmtree(out)
    log = work / "logs" / f"{side}-{tag}.log"
    timings = work / "logs" / f"{side}-{tag}.json"
    if side == "sdflow":
        cmd = sdflow_command(args, model, table, out, steps)
    else:
        cmd = baseline_command(args, model, table, out, steps, timings)
    load_avg = os.getloadavg()[0]
    server_before = kept_server_cpu(env["PREFECT_HOME"])
    launched, exited, wall, cpu, code = run_process(cmd, env, log)
    if side == "sdflow":  # a kept server is no child of the run: its CPU for the run is added here
        server_after = kept_server_cpu(env["PREFECT_HOME"])
        if server_after:
            cpu += server_after[1] - (server_before[1] if server_before and server_before[0] == server_after[0] else 0)
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{side} failed with exit code {code}: {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")
    if side == "sdflow":
        manifest = json.loads((out / "manifest.json").read_text())
        inner, images = manifest["timings"], manifest["rows"]["generated"]
        finished = datetime.fromisoformat(inner["finished"]).timestamp()
    else:
        inner = json.loads(timings.read_text())
        images, finished = inner["images"], inner["finished_at"]
    gen = inner["generation_seconds"]
    return Run(
        side,
        int(tag[1:]) if tag.startswith("r") else -1,
        wall,
        cpu,
        images,
        load=inner["model_load_seconds"],
        gen=gen,
        before=finished - gen - launched,
        after=exited - finished,
        inner=inner,
        load_avg=load_avg,
    )


def kept_server_cpu(prefect_home: str) -> tuple[int, float] | None:
    """The kept Prefect server of sdflow's PREFECT_HOME (flows/server.py registers it) and its CPU seconds so far."""
    try:
        pid = json.loads((Path(prefect_home) / "sdflow-server.json").read_text())["pid"]
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (OSError, ValueError, KeyError):
        return None
    return pid, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def stop_kept_server(prefect_home: str) -> None:
    """The benchmark's runs are over: stop sdflow's kept server now rather than after its idle time."""
    found = kept_server_cpu(prefect_home)
    if found:
        os.kill(found[0], 15)


# --- reporting ------------------------------------------------------------------------------------------


def compare_images(sdflow_out: Path, baseline_out: Path) -> str:
    """Largest per-pixel difference between the two sides' images, matched by id."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    shards = sorted((sdflow_out / "data").glob("*.parquet"))
    ours = pa.concat_tables([pq.read_table(p, columns=["id", "image"]) for p in shards]).to_pydict()
    theirs = pq.read_table(baseline_out / "images.parquet").to_pydict()
    by_id = dict(zip(theirs["id"], theirs["image"]))
    worst, over_one = 0, 0
    for row_id, image in zip(ours["id"], ours["image"]):
        a = np.asarray(Image.open(io.BytesIO(image["bytes"])).convert("RGB"), dtype=np.int16)
        b = np.asarray(Image.open(io.BytesIO(by_id[row_id])).convert("RGB"), dtype=np.int16)
        if a.shape != b.shape:
            return f"images differ in size: {a.shape} vs {b.shape}"
        diff = int(np.abs(a - b).max())
        worst = max(worst, diff)
        over_one += diff > 1
    return (
        f"{len(ours['id'])} images compared by id: largest pixel difference {worst} (uint8 levels), "
        f"{over_one} image(s) differ by more than 1"
    )


def report(args, setup: dict, runs: list[Run], warmups: dict, compare: str | None, warning: str | None) -> None:
    params = setup["params"]
    total = sum(params.values())
    side = setup["image_side"]
    print()
    print("sdflow throughput benchmark: whole process, wall clock from start to exit")
    print(f"  model    : toy '{args.size}', {total / 1e6:.2f} M parameters "
          f"({', '.join(f'{k} {v / 1e6:.2f} M' for k, v in params.items())})")
    print(f"  workload : {args.rows} rows -> {side}x{side} images, {args.steps} steps, guidance {args.guidance:g}, "
          f"scheduler {args.scheduler or 'the model default'}, batch {args.batch_size}, shard {args.shard_size}")
    print(f"  machine  : {os.cpu_count()} CPUs, torch threads {setup['threads']}, load average before "
          f"{setup['load_before']:.1f}, after {os.getloadavg()[0]:.1f}; on a shared machine timings are noisy")
    if warning:
        print(f"  WARNING  : {warning}")
    if warmups:
        print("  warm-up  : " + ", ".join(f"{k} {v:.1f} s" for k, v in warmups.items())
              + " (1 row, 1 step, untimed; sdflow's creates its Prefect database and launches its kept server)")
    print()
    header = (f"  {'':9} {'runs':>4} {'best s':>7} {'img/s':>6} {'median s':>8} {'img/s':>6} {'CPU s':>6}"
              f" {'before':>7} {'load':>5} {'gen s':>6} {'gen img/s':>9} {'after':>6}")
    print(header)
    print("  " + "-" * (len(header) - 2))
    stats = {}
    for name in ("baseline", "sdflow"):
        mine = sorted((r for r in runs if r.side == name), key=lambda r: r.wall)
        if not mine:
            continue
        med = statistics.median(r.wall for r in mine)
        b = mine[0]
        stats[name] = {"best": b.rate, "median": b.images / med, "gen": statistics.median(r.images / r.gen for r in mine)}
        print(f"  {name:9} {len(mine):4} {b.wall:7.1f} {b.rate:6.2f} {med:8.1f} {b.images / med:6.2f} {b.cpu:6.1f}"
              f" {b.before:7.1f} {b.load:5.1f} {b.gen:6.1f} {b.images / b.gen:9.2f} {b.after:6.1f}")
    print()
    print("  best = the fastest run, its figures on the rest of the line; median over all runs. CPU s: the process")
    print("  and its children, and for sdflow its Prefect server's CPU during the run (a kept server's too: it was")
    print("  launched by the warm-up run unless SDFLOW_SERVER_IDLE_SECONDS=0). before = start to the first batch: interpreter,")
    print("  imports, (sdflow: Prefect server start, flow run, table check), model load (of which 'load');")
    print("  gen = the generation loop to the last output file written; after = from then to the process's exit.")
    if "sdflow" in stats and "baseline" in stats:
        a, b = stats["sdflow"], stats["baseline"]
        print()
        print(f"  sdflow/baseline images/s, whole process : best {a['best'] / b['best']:.3f}, "
              f"median {a['median'] / b['median']:.3f}   (>= 1: sdflow at least as fast)")
        print(f"  sdflow/baseline images/s, generation    : median {a['gen'] / b['gen']:.3f}")
    if compare:
        print(f"  images   : {compare}")
    print()
    print("  all runs: " + "; ".join(f"{r.side} #{r.repeat + 1} {r.wall:.1f} s (load {r.load_avg:.1f})" for r in runs))


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sdflow-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    (work / "out").mkdir(exist_ok=True)

    env = dict(os.environ)
    env.update(COMMON_ENV)
    env["PREFECT_HOME"] = args.prefect_home or str(work / "prefect-home")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    env.pop("PYTHONPROFILEIMPORTTIME", None)

    setup_load = os.getloadavg()[0]
    try:
        print(f"work dir {work}; building the '{args.size}' toy model ...", flush=True)
        model = work / f"model-{args.size}"
        if model.exists():
            shutil.rmtree(model)
        setup = build_model(model, args.size, args.steps, args.guidance, args.device)
        setup["load_before"] = setup_load
        table = work / "prompts.parquet"
        write_prompt_table(table, args.rows, args.seed)
        warning = check_scheduler_tables()
        sides = [args.only] if args.only else ["sdflow", "baseline"]

        warmups = {}
        if not args.no_warmup:
            tiny = work / "warmup.parquet"
            write_prompt_table(tiny, 1, args.seed)
            for name in sides:
                print(f"warm-up {name} ...", flush=True)
                warmups[name] = run_side(name, args, env, work, model, tiny, "warmup", steps=1).wall

        runs: list[Run] = []
        for repeat in range(args.repeats):
            order = sides if repeat % 2 == 0 else sides[::-1]
            for name in order:
                print(f"run {repeat + 1}/{args.repeats}: {name} ...", flush=True)
                run = run_side(name, args, env, work, model, table, f"r{repeat}", steps=args.steps)
                print(f"  {run.wall:.1f} s, {run.rate:.2f} images/s", flush=True)
                runs.append(run)
                if name == "baseline":
                    setup["threads"] = run.inner.get("torch_threads")
        if "threads" not in setup:
            setup["threads"] = args.threads or "default"

        compare = None
        if not args.no_compare and len(sides) == 2:
            last = f"r{args.repeats - 1}"
            compare = compare_images(work / "out" / f"sdflow-{last}", work / "out" / f"baseline-{last}")
        report(args, setup, runs, warmups, compare, warning)
    finally:
        stop_kept_server(env["PREFECT_HOME"])
        close_workdir(args, work)


def close_workdir(args: argparse.Namespace, work: Path) -> None:
    """Keep the work folder when asked to (--keep, or a --workdir of the user's), else delete it."""
    if args.keep or args.workdir:
        print(f"\nkept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
