"""The `sdflow` command: runs the flows with a progress bar, and turns errors into one paragraph and an exit code."""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import os
import re
import signal
import sys
import textwrap
import threading
import warnings
from contextlib import nullcontext
from importlib.resources import files

EXIT_INPUT = 2  # the user can fix the input; the message says what is wrong
EXIT_BUG = 1  # anything else

# The signals that stop a run in order: Ctrl-C, kill/Docker/Kubernetes/SLURM, a closed terminal. Exit 128 + N.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# C0 and C1 controls (ESC starts terminal sequences) and bidirectional overrides: printed escaped, since table
# text (column names, ids, paths) reaches messages and must not drive or disguise the terminal.
CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


class Stopped(KeyboardInterrupt):
    """A stop signal arrived: raised in the main thread, so the run unwinds as after Ctrl-C and never records it as a row failure."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_signalled: list[int] = []  # the stop signals this run received


def raise_stopped(signum: int, frame) -> None:
    _signalled.append(signum)
    raise Stopped(signum)


def stop_on_signals() -> dict:
    """Make the stop signals raise Stopped in the main thread; returns the handlers they replace."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # an in-process caller on another thread: signals are its own business
    # A signal the caller ignores stays ignored: `nohup sdflow ...` must survive the terminal's hangup, and a
    # background job its shell's Ctrl-C.
    return {s: signal.signal(s, raise_stopped) for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}


def stopping_signal(error: BaseException) -> int | None:
    """The signal behind `error`: ours, Prefect's TerminationSignal (its SIGTERM handler during a flow), or an error
    that Prefect raised while handling either; None if no signal is behind it."""
    from nodes.errors import exception_chain

    for link in exception_chain(error):
        if isinstance(link, Stopped):
            return link.signum
        if isinstance(link, KeyboardInterrupt):
            return signal.SIGINT
        if type(link).__name__ == "TerminationSignal":
            return getattr(link, "signal", signal.SIGTERM)
    return None


def printable(text: str) -> str:
    """`text` with control characters escaped (ESC as \\x1b): safe to print, still readable."""
    return CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


class PrintableFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def example_prompts() -> str:
    return str(files("nodes.shapes") / "data" / "example_prompts.parquet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdflow", description="Turn Parquet tables of prompts into image datasets.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Prefect's logs and full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate the images of a prompt table's rows (one per row unless asked for more)")
    gen.add_argument("prompts", help="Parquet prompt table: local path or fsspec URL (s3://...); 'example' for the bundled one")
    gen.add_argument("out", help="output dataset folder: local path or fsspec URL")
    gen.add_argument("--model", help="a diffusers folder, a single-file checkpoint (.safetensors, SD 1.x/2.x/SDXL, original layout), either as a local path or fsspec URL, or a hub id (default: sdflow:shapes, the embedded model)")
    gen.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], help="what a single-file SD 2.x checkpoint predicts (its tensors do not say): epsilon for the 512 base models, v_prediction for the 768 ones")
    gen.add_argument("--model-config", dest="checkpoint_config", help="a diffusers folder (configs suffice) describing a single-file checkpoint's architecture, for fine-tunes that differ from their family (default: sdflow's configs of the family)")
    gen.add_argument("--vae", help="a separate VAE to decode with: a diffusers folder, or a .safetensors file of the model's VAE architecture")
    gen.add_argument("--embedding", action="append", metavar="PATH[:TOKEN]", help="a textual-inversion embedding (A1111 .pt/.safetensors, diffusers, SDXL clip_l/clip_g); prompts name it by TOKEN, default the file's stem; repeatable")
    gen.add_argument("--scheduler", help="sampler, e.g. euler_a or dpmpp_2m_karras; a name it does not know lists them all (default: the model's own)")
    gen.add_argument("--steps", type=int, help="denoising steps (default: the model's, else 50)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale; <= 1 disables it (default: the model's, else the pipeline's: 7.5, SDXL 5.0)")
    gen.add_argument("--guidance-rescale", type=float, default=0.0, help="diffusers' guidance_rescale, 0 to 1; 0.7 is usual for v-prediction models (default: 0)")
    gen.add_argument("--clip-skip", type=int, default=0, help="diffusers' clip_skip: text encoder layers to skip, 0 for none (A1111's Clip skip minus 1; default: 0)")
    gen.add_argument("--width", type=int, help="pixels (default: the model's native size)")
    gen.add_argument("--height", type=int, help="pixels (default: the model's native size)")
    gen.add_argument("--negative-prompt", help="default negative prompt (default: none)")
    gen.add_argument("--images-per-prompt", type=int, default=1, help="images each row makes, seeds seed+0, seed+1, ...; a row's `images` column overrides it (default: 1)")
    gen.add_argument("--batch-size", type=int, default=8, help="images per U-Net batch (default: 8)")
    gen.add_argument("--shard-size", type=int, default=256, help="images (output rows) per output Parquet file (default: 256)")
    gen.add_argument("--seed", type=int, default=0, help="run seed, from which rows without a seed derive theirs (default: 0)")
    gen.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if present, else cpu)")
    gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on CUDA, float32 on CPU")
    gen.add_argument("--image-format", default="png", help="png (lossless, default), webp (lossless unless --quality) or jpeg")
    gen.add_argument("--quality", type=int, help="1 to 100: lossy WebP at this quality, or JPEG's (default for jpeg: 95); not with png")
    gen.add_argument("--lora", action="append", metavar="PATH[:WEIGHT]", help="a LoRA .safetensors file (kohya/A1111 or diffusers format) for every row, at WEIGHT (default 1); repeatable")
    gen.add_argument("--lora-dir", help="where rows' `loras` names and prompts' <lora:NAME:WEIGHT> tags find NAME.safetensors")
    gen.add_argument("--skip-invalid", action="store_true", help="leave invalid rows out (listed in the manifest) instead of stopping")
    gen.add_argument("--allow-pickle", action="store_true", help="also load pickle checkpoints (.bin); they can run code")
    gen.add_argument("--storage-options", help="JSON fsspec storage options (credentials, endpoint); never logged")
    gen.add_argument("--compile", action="store_true", help="torch.compile the U-Net and VAE decoder (compiled code cached in SDFLOW_CACHE)")
    gen.add_argument("--stage-tasks", action="store_true", help="run each stage of each batch as a Prefect task run of its own, for a per-stage timeline in the UI (about 5x the events; default: one task run per batch)")
    gen.add_argument("--pool", help="run shards on the workers serving this pool (`sdflow worker --pool NAME`) instead of here")

    judge = commands.add_parser("evaluate", help="score a generated dataset of the shapes domain against its prompts")
    judge.add_argument("out", help="dataset folder written by `sdflow generate`: local path or fsspec URL")
    judge.add_argument("--model", help="model whose clip/ gives the CLIP scores (default: the embedded model)")
    judge.add_argument("--sheet-rows", type=int, default=32, help="images on the contact sheet (default: 32)")
    judge.add_argument("--storage-options", help="JSON fsspec storage options (credentials, endpoint); never logged")

    work = commands.add_parser("worker", help="serve a pool's shards on one device, keeping the model loaded (needs PREFECT_API_URL)")
    work.add_argument("--pool", required=True, help="the pool to serve, as given to `sdflow generate --pool`")
    work.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if present, else cpu); one worker per GPU")
    work.add_argument("--model", help="load this model before the first shard arrives (default: load on the first shard)")
    work.add_argument("--storage-options", help="JSON fsspec storage options for the output and model (never logged)")
    return parser


def configure_logging(verbose: bool) -> None:
    """Before Prefect is imported: its console logs only when asked; sdflow's warnings always, one line each."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_SERVER_LEVEL", "CRITICAL")
        # The flow run's own records still reach the API (the UI's Logs tab) at INFO, the task runs' from
        # WARNING: each task run's INFO is "Finished in state Completed()", one per stage per batch, which the UI
        # shows as the run's state anyway and which would bury sdflow's records. These loggers carry Prefect's
        # API handler; QuietConsole keeps them off the console. Set in the environment, the levels survive
        # Prefect's later reconfigurations of its loggers.
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL", "INFO")
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "WARNING")
    # Prefect warns at import when it cannot make PREFECT_HOME, in two raw lines; sdflow's own error says it in
    # one paragraph, with the fix, when the temporary server needs it.
    warnings.filterwarnings("ignore", message="Failed to create the Prefect home")
    log = logging.getLogger("sdflow")
    for old in [h for h in log.handlers if getattr(h, "sdflow_cli", False)]:
        log.removeHandler(old)  # bound to an earlier sys.stderr (in-process callers)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("sdflow: %(levelname)s: %(message)s"))
    handler.sdflow_cli = True
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    log.addHandler(handler)
    log.setLevel(logging.INFO)  # INFO goes to the API (log_runs_to_api), the console shows warnings unless -v
    log.propagate = False


def in_a_run(record: logging.LogRecord) -> bool:
    """Whether `record` was made in a flow or task run (a logging filter)."""
    from prefect.context import FlowRunContext, TaskRunContext

    return bool(FlowRunContext.get() or TaskRunContext.get())


def log_runs_to_api() -> None:
    """sdflow's records logged inside a flow or task run also go to that run's logs on the Prefect API (the UI).

    Prefect's own API handler, limited to records made in a run: outside one it has no run to file them under,
    and would warn about each on the console.
    """
    from prefect.logging.handlers import APILogHandler

    log = logging.getLogger("sdflow")
    if any(getattr(h, "sdflow_api", False) for h in log.handlers):
        return
    handler = APILogHandler()
    handler.addFilter(in_a_run)
    handler.sdflow_api = True
    log.addHandler(handler)


class QuietConsole(logging.Filter):
    """Keeps Prefect's and its server's records off the console (not off the API) while the CLI runs a flow.

    A filter on the console handlers rather than logger levels: Prefect may reconfigure its loggers when a
    run starts (in-process callers, test harnesses), but it keeps its handlers.
    """

    NOISY = ("prefect", "docket", "uvicorn", "httpx", "sqlalchemy")

    def __init__(self) -> None:
        super().__init__()
        from prefect.logging.configuration import ensure_logging_setup

        ensure_logging_setup()  # Prefect makes its handlers once; later setups only adjust levels
        loggers = [logging.getLogger()] + [
            logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.startswith(self.NOISY)
        ]
        self.handlers = {
            h for logger in loggers for h in logger.handlers if type(h).__name__ in ("PrefectConsoleHandler", "StreamHandler")
        }
        for handler in self.handlers:
            handler.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.CRITICAL or not record.name.startswith(self.NOISY)

    def close(self) -> None:
        for handler in self.handlers:
            handler.removeFilter(self)


def serve_worker(args: argparse.Namespace) -> int:
    """`sdflow worker`: a long-lived Prefect task worker for one pool and one device."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return fail("a worker needs a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api).", EXIT_INPUT)
    from flows.worker import serve_shards

    collect_garbage_from_here()
    print(f"sdflow: worker serving pool {args.pool!r}; Ctrl-C stops it.", file=sys.stderr)
    try:
        serve_shards(args.pool, args.device, args.model)
    except KeyboardInterrupt:
        pass
    return 0


def fail_text(message: str) -> str:
    return textwrap.fill(
        printable(f"sdflow: error: {message}"),
        width=100,
        subsequent_indent="  ",
        break_on_hyphens=False,  # URLs and paths stay whole, to be copied from the terminal
        break_long_words=False,
    )


def say(text: str) -> None:
    """One line (or paragraph) on stderr; a terminal that hung up (EIO) must not turn an exit code into a traceback."""
    try:
        print(text, file=sys.stderr)
    except OSError:
        pass


def fail(message: str, code: int) -> int:
    say(fail_text(message))
    return code


def evaluation_summary(result: dict, out: str) -> str:
    from nodes.shapes.evaluate import summary_markdown

    text = f"sdflow: scored {result['rows']} images of {out} in {result['seconds']:.1f} s"
    if result["out_of_domain"]:
        text += f" ({result['out_of_domain']} prompt(s) outside the shapes domain were judged but not scored)"
    text += f"; scores in {out}/evaluation/data/, contact sheet {out}/evaluation/contact_sheet.png.\n"
    return text + summary_markdown(result["summary"]).rstrip()


def main(argv: list[str] | None = None) -> int:
    environment = dict(os.environ)
    handlers = stop_on_signals()
    try:
        return run(build_parser().parse_args(argv))
    finally:  # in-process callers get their environment and signal handlers back (these are for this run only)
        os.environ.clear()
        os.environ.update(environment)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


_as_command = False  # set by entry(): this process is the `sdflow` command, not an in-process caller
_lost: list[str] = []  # why this run's temporary server is gone, when it died under the run


def server_lost(message: str) -> None:
    """The temporary server died mid-run (called from the thread that watches it): stop the run now, in one paragraph.

    As the command, exit at once: every Prefect call would now retry a refused connection for about a minute
    (it retries once it has connected), each failing task run a row, and the commit protocol makes a hard stop
    as safe as a SIGKILL: a shard without its marker is redone by the rerun. In process, interrupt the run.
    """
    _lost.append(message)
    if _as_command:
        os.write(2, (fail_text(message) + "\n").encode())
        os._exit(EXIT_BUG)
    import _thread

    _thread.interrupt_main()


def check_obvious_inputs(args: argparse.Namespace) -> None:
    """What can be found wrong in milliseconds, before a server starts or torch loads: local paths and names.

    The flow checks everything again, fully; this only spares a user the seconds of start-up for a typo.
    """
    from nodes.errors import SdflowError

    local = lambda ref: "://" not in ref or ref.startswith("file://")  # noqa: E731
    if args.command == "generate":
        path = args.prompts.removeprefix("file://")
        if args.prompts != "example" and local(args.prompts) and not os.path.exists(os.path.expanduser(path)):
            raise SdflowError(f"prompt table {args.prompts} does not exist.")
        if args.scheduler is not None:
            from nodes.params import SAMPLERS  # the one table of names (pyarrow: only when asked)

            if args.scheduler not in SAMPLERS:
                raise SdflowError(f"--scheduler {args.scheduler!r} is not one of: {', '.join(SAMPLERS)}.")
        if args.image_format != "png" or args.quality is not None:
            from nodes.params import image_format, image_format_rule

            if image_format(args.image_format, args.quality) is None:
                raise SdflowError(image_format_rule(args.image_format, args.quality))
        if args.compile and args.pool:
            raise SdflowError("--compile applies to generation in this process; leave it out with --pool (workers load their own models).")
    model = args.model or ""
    # As the flow reads a model reference: a path when it starts like one or is not of the hub's "org/name" form.
    if model and local(model) and (model.startswith((".", "/", "~", "file://")) or model.count("/") != 1):
        if not os.path.exists(os.path.expanduser(model.removeprefix("file://"))) and ":" not in model:
            raise SdflowError(
                f"model {model} does not exist; --model takes a diffusers folder, a single-file checkpoint or a hub id."
            )


def run(args: argparse.Namespace) -> int:
    configure_logging(args.verbose)
    if args.storage_options is not None:
        os.environ["SDFLOW_STORAGE_OPTIONS"] = args.storage_options
    from nodes.errors import SdflowError

    if args.command == "worker":
        log_runs_to_api()
        quiet = QuietConsole() if not args.verbose else None  # Prefect's records of its task runs: for the API only
        try:
            return serve_worker(args)
        finally:
            if quiet:
                quiet.close()
    quiet = None
    _lost.clear()
    _signalled.clear()
    try:
        check_obvious_inputs(args)
        from prefect.settings import PREFECT_API_URL

        if args.command == "generate" and args.pool and not PREFECT_API_URL.value():
            raise SdflowError(
                "--pool needs a Prefect server that the pool's workers also reach: set PREFECT_API_URL (e.g."
                " http://127.0.0.1:4200/api, from `prefect server start`). Without it, this run's temporary server"
                " is out of every worker's reach."
            )
        quiet = QuietConsole() if not args.verbose else None
        log_runs_to_api()
        from flows.server import start_temporary_server

        server = start_temporary_server()
        if server:  # it cannot be waited for: stop the run now, with what it said
            server.on_lost = server_lost
        with server.settings() if server else nullcontext():
            if args.command == "evaluate":
                from flows.evaluate import evaluate_dataset

                collect_garbage_from_here()
                if server:
                    server.wait()
                result = evaluate_dataset(out=args.out, model=args.model, sheet_rows=args.sheet_rows)
                message = evaluation_summary(result, args.out)
            else:
                message = generate(args, server)
    except BaseException as e:
        if _lost:
            return fail(_lost.pop(), EXIT_BUG)
        # Once a stop signal has arrived, whatever ends the run is its unwinding, even an error that does not
        # chain to it (one library caught the interrupt and raised its own, once under load): it stopped as asked.
        signum = stopping_signal(e) or (_signalled[0] if _signalled else None)
        if signum:  # a shard under way is not committed: the rerun makes it, and only it
            name = signal.Signals(signum).name
            return fail(f"stopped by {name}; the shards committed so far are kept: rerun to finish.", 128 + signum)
        if args.verbose or not isinstance(e, Exception):
            raise
        if isinstance(e, SdflowError):
            return fail(str(e), EXIT_INPUT)
        # a bug or an environment failure: say what, and how to see more
        return fail(f"{type(e).__name__}: {e} (run with --verbose for the traceback).", EXIT_BUG)
    finally:
        if quiet:
            quiet.close()
    say(printable(message))
    return 0


def generate(args: argparse.Namespace, server) -> str:
    """Run the generation flow; returns its summary line."""
    from flows.generate import generate_dataset, summary

    if not args.pool:  # a pool's parent loads no model
        from nodes.pipeline.components import import_model_classes

        import_model_classes()  # while the server boots, not after; and with the collector still off
    collect_garbage_from_here()
    if server:
        server.wait()
    manifest = generate_dataset(
        prompts=example_prompts() if args.prompts == "example" else args.prompts,
        out=args.out,
        model=args.model,
        scheduler=args.scheduler,
        steps=args.steps,
        guidance=args.guidance,
        guidance_rescale=args.guidance_rescale,
        clip_skip=args.clip_skip,
        vae=args.vae,
        checkpoint_config=args.checkpoint_config,
        prediction_type=args.prediction_type,
        embeddings=args.embedding,
        width=args.width,
        height=args.height,
        negative_prompt=args.negative_prompt,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        skip_invalid=args.skip_invalid,
        loras=args.lora,
        lora_dir=args.lora_dir,
        allow_pickle=args.allow_pickle,
        torch_compile=args.compile,
        stage_tasks=args.stage_tasks,
        pool=args.pool,
        progress=sys.stderr.isatty() or args.verbose,
        image_format=args.image_format,
        image_quality=args.quality,
        images_per_prompt=args.images_per_prompt,
    )
    return f"sdflow: {summary(manifest, args.out)}"


def collect_garbage_from_here() -> None:
    """The command's imports are done: freeze what they made, and let the cyclic garbage collector run from here on.

    entry() turns the collector off for the imports. Prefect, torch, diffusers and transformers make millions of
    objects as they load, and every full collection on the way walks all of those made so far: 2 s of a
    one-image run measured here (8.5 s to exit with it, 6.4 s without). Frozen (gc.freeze), they are never walked
    again in the run either. In-process callers of main() keep their collector as it was.
    """
    if _as_command and not gc.isenabled():
        gc.freeze()
        gc.enable()


def flush_to_api() -> None:
    """Send the log records and events Prefect still holds, while the temporary server runs.

    Prefect drains them in threading's exit hooks, which the command's quick exit skips: the last 2 s of logs
    (its batch interval), the flow run's last records and the summary among them, would never arrive.
    """
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=5)
        except Exception:  # a server already gone: nothing more to tell it
            pass


def entry() -> None:
    """The `sdflow` console command: main(), then a quick exit.

    Tearing down an interpreter that holds torch, diffusers and Prefect takes seconds (measured 3.5 s here)
    and does nothing useful once the flow has finished: every file is written and closed, and Prefect's
    logs and events are sent and its exit handlers (stopping the temporary server) run here first. So exit
    without the teardown.
    """
    global _as_command
    _as_command = True
    gc.disable()  # until the imports are done: collect_garbage_from_here()
    code = main()
    # The run has ended (stopped or not): a further Ctrl-C must not cut the exit handlers short (the temporary
    # server's stop among them), nor print a traceback from them; they take a few seconds at most.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    flush_to_api()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
