"""Prefect's API server for CLI runs: Prefect's own server app, launched without importing it here, and kept.

With no PREFECT_API_URL, Prefect would start this server itself (its `SubprocessASGIServer`) at the flow's
first API call, after every import, and stop it at exit. The CLI starts it first, so that its seconds of boot
overlap torch's and diffusers' imports. It does not use `SubprocessASGIServer` for that: importing that class
imports the whole server (FastAPI routes, SQLAlchemy models) into this process, 2.3 s of Python measured here,
which holds the GIL against the main thread's imports, so the boot never really overlapped them. Launched with
the same command and environment, the server does all of that in its own process, on the other core.

Booting it costs about 1 s of a run's wall time and 3.7 CPU s (measured on 2 cores), most of a one-image run's
cost over a plain diffusers script. So by default the server outlives the run that launched it, for
SDFLOW_SERVER_IDLE_SECONDS (300) after the last run using it ends, and the runs of one PREFECT_HOME share it:
a compiler server's pattern (sccache, Gradle's daemon). Each run holds a shared lock on a lease file for its
whole life; the kernel drops it when the run's process ends, however it ends. The server stops itself once it
can take that lock exclusively, and has been able to for the idle time. With SDFLOW_SERVER_IDLE_SECONDS=0, each
run has a server of its own, stopped with it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

from nodes.errors import SdflowError

STARTUP_FAILURE = 3  # uvicorn's exit code when it cannot start: its port taken, or the app failed to start
# Prefect's own bound is 20 s, but a fresh database took 23.7 s to answer on a busy 2-core machine: the run would
# fail for want of patience. PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS still sets it when given.
STARTUP_TIMEOUT = 90.0
# Never handed to the server: it needs no storage credentials, and a process's environment is readable by others
# of the same user (/proc/PID/environ) for its whole life, which for a kept server is many runs'.
PRIVATE_ENV = ("SDFLOW_STORAGE_OPTIONS", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
IDLE_SECONDS = 300.0  # how long a kept server waits for the next run (SDFLOW_SERVER_IDLE_SECONDS)
# In PREFECT_HOME, beside the database: the kept server's address, its lease, the lock of its launch, its log.
REGISTRATION, LEASE, LAUNCH_LOCK, LOG = "sdflow-server.json", "sdflow-server.lease", "sdflow-server.launch", "sdflow-server.log"
# Run in the server process before uvicorn: it stops the server when the CLI is gone. The server has a session
# of its own (so that a terminal's Ctrl-C reaches only the CLI, which then stops it in order), so nothing else
# would end it after a SIGKILL of the CLI.
WATCH_PARENT = """
import os, signal, sys, threading, time
def watch(parent=os.getppid()):
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=watch, daemon=True).start()
from uvicorn.main import main
sys.argv[0] = "uvicorn"
main()
"""
# Run in a kept server instead: it stops the server once no run has held the lease (a shared flock) for the idle
# time. It takes the lease exclusively to stop, and holds it until the process ends, so a run that arrives then
# waits for the stop and launches a successor. The registration goes first, unless a successor has replaced it.
WATCH_LEASE = """
import fcntl, json, os, signal, sys, threading, time
lease, idle, registration = sys.argv[1], float(sys.argv[2]), sys.argv[3]
del sys.argv[1:4]
def watch():
    fd = os.open(lease, os.O_RDWR | os.O_CREAT, 0o600)
    idle_since = time.monotonic()
    while True:
        time.sleep(min(1.0, idle / 4))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            idle_since = time.monotonic()
            continue
        if time.monotonic() - idle_since < idle:
            fcntl.flock(fd, fcntl.LOCK_UN)
            continue
        try:
            with open(registration) as f:
                if json.load(f).get("pid") == os.getpid():
                    os.unlink(registration)
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        os._exit(0)
threading.Thread(target=watch, daemon=True).start()
from uvicorn.main import main
sys.argv[0] = "uvicorn"
main()
"""


class ServerError(SdflowError):
    """Prefect's temporary API server could not start: the message names the cause and the setting that fixes it."""


def free_port(port: int = 0) -> int:
    """`port` if it is free on loopback now, else 0; with port 0, a free port of the OS's choice."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return 0
        return sock.getsockname()[1]


class TemporaryServer:
    """Prefect's API server (`prefect.server.api.server:create_app` under uvicorn) for this process's runs.

    Kept (`idle` > 0): found through PREFECT_HOME's registration, or launched and registered there, and leased
    for as long as this object lives. Else: launched for this process alone, and stopped with it.
    """

    def __init__(self, idle: float = 0.0) -> None:
        import prefect
        from prefect.settings import get_current_settings

        settings = get_current_settings()
        self.database = database_file(settings)
        self.home = Path(settings.home)
        check_home(self.home, self.database)
        self.app_dir = str(Path(prefect.__file__).parent.parent)
        # As SubprocessASGIServer: no UI, the server knows it is ephemeral, and it gets this process's settings.
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in PRIVATE_ENV},
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **settings.to_environment_variables(exclude_unset=True),
        }
        self._stopping = False
        self.on_lost: Callable[[str], None] | None = None  # called (from a thread) if it dies after it was ready
        self.idle = idle
        self.process: subprocess.Popen | None = None  # None when this process found it running
        self._lease: int | None = None
        self.log = None
        if idle > 0:
            self._lease = take_lease(self.home / LEASE)
            with locked(self.home / LAUNCH_LOCK):
                found = registered_server(self.home / REGISTRATION)
                if found and found["identity"] == self.identity():
                    self.pid, self.port, self.kept = found["pid"], found["port"], True
                elif found:  # another version's, or other settings': a server of this run's own beside it
                    self._release_lease()
                    self.kept, self.idle = False, 0.0
                    self._launch()
                else:
                    self.kept = True
                    self._launch()
        else:
            self.kept = False
            self._launch()
        atexit.register(self.stop)
        self._failure: Exception | None = None
        self._ready = threading.Event()  # set once it answers, or has failed to
        timeout = settings.server.ephemeral.startup_timeout_seconds
        if "startup_timeout_seconds" not in settings.server.ephemeral.model_fields_set:
            timeout = STARTUP_TIMEOUT
        self._booting = threading.Thread(target=self._await_ready, args=(timeout,), name="sdflow-prefect-server", daemon=True)
        self._booting.start()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def identity(self) -> str:
        """What a run needs a kept server to share with it: Prefect, the interpreter, the database, server settings."""
        server_settings = sorted((k, v) for k, v in self.env.items() if k.startswith(("PREFECT_SERVER", "PREFECT_API_DATABASE")))
        text = json.dumps([prefect_version(), sys.executable, self.database, server_settings])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _launch(self) -> None:
        """Start the server process on a free port; a kept one is registered at once, so that others wait for it."""
        self.port = free_port()
        if self.kept:
            self.log = open(self.home / LOG, "w+b")
            watch = [WATCH_LEASE, str(self.home / LEASE), str(self.idle), str(self.home / REGISTRATION)]
        else:
            self.log = tempfile.TemporaryFile()  # its stderr: read for the cause when it fails, kept off the terminal
            watch = [WATCH_PARENT]
        command = [sys.executable, "-c", *watch, "--app-dir", self.app_dir, "--factory"]
        command += ["prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--log-level", "error", "--lifespan", "on"]
        self.process = subprocess.Popen(
            command, env=self.env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, start_new_session=True
        )
        self.pid = self.process.pid
        if self.kept:
            register(self.home / REGISTRATION, {"pid": self.pid, "port": self.port, "identity": self.identity()})

    def alive(self) -> bool:
        return self.process.poll() is None if self.process else server_alive(self.pid, self.port)

    def wait(self) -> None:
        """Return once the server is ready; raise if it exited or did not answer in time."""
        self._ready.wait()
        if self._failure:
            raise self._failure

    def _await_ready(self, timeout: float) -> None:
        try:
            self._poll(timeout)
            if self.process:  # launched here; a kept one found running was lowered by its launcher
                serve_at_low_priority(self.process.pid)
        except Exception as e:  # for wait() to raise in the main thread
            self._failure = e
            return
        finally:
            self._ready.set()
        code = self.process.wait() if self.process else wait_for_exit(self.pid)  # a run cannot go on without it
        if not self._stopping and self.on_lost:
            ended = f"exited with code {code}" if code is not None else "exited"
            self.on_lost(
                f"Prefect's temporary API server (pid {self.pid}) {ended} in the middle of the"
                f" run{self._last_words()}. The shards committed so far are kept: run the same command again to finish."
            )

    def _log_text(self) -> str:
        """The server's log: its stderr, from this process's own file of it or from PREFECT_HOME's."""
        if self.log is None:
            try:
                return (self.home / LOG).read_bytes()[-4096:].decode(errors="replace")
            except OSError:
                return ""
        self.log.seek(0, os.SEEK_END)
        self.log.seek(max(0, self.log.tell() - 4096))
        return self.log.read().decode(errors="replace")

    def _last_words(self) -> str:
        """The last line the server wrote, as a clause ("" if none): its own account of why it stopped."""
        lines = [line.strip() for line in self._log_text().splitlines() if line.strip()]
        return f" (its last words: {lines[-1][:300]})" if lines else ""

    def _startup_failure(self, code: int | None) -> ServerError:
        """Why the server exited before it was ready, with what fixes it."""
        text = self._log_text()
        if "database is locked" in text:
            return ServerError(
                f"Prefect's temporary API server cannot start: its database {self.database} is locked by another"
                " process (another sdflow or Prefect run with the same PREFECT_HOME?). Wait for that run to end, or"
                " set PREFECT_HOME to a folder of this run's own."
            )
        if "unable to open database file" in text or "readonly database" in text or "Permission denied" in text:
            return ServerError(
                f"Prefect's temporary API server cannot write its database {self.database}: set PREFECT_HOME to a"
                " writable folder (or PREFECT_API_URL to a running Prefect server)."
            )
        ended = f"exited with code {code}" if code is not None else "exited"
        return ServerError(
            f"Prefect's temporary API server {ended} before it was ready{self._last_words()}. Set"
            " PREFECT_API_URL to a running Prefect server to run without it."
        )

    def _poll(self, timeout: float) -> None:
        """Wait for the server's health check, then make its first API call.

        A fresh server's first API call took 0.3 s here (the next ones, milliseconds). The flow's client begins
        with this one (the API version check); made here, in the background, it overlaps torch's imports.
        """
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll() if self.process else (None if self.alive() else -1)
            if code == STARTUP_FAILURE and self.process and not free_port(self.port):  # the port was taken since
                with locked(self.home / LAUNCH_LOCK) if self.kept else contextlib.nullcontext():
                    self._launch()
            elif code is not None:  # a failure that another port would not mend: its log says which
                raise self._startup_failure(code if self.process else None)
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=1) as response:
                    healthy = response.status == 200
            except OSError:
                healthy = False
            if healthy:
                with urllib.request.urlopen(f"{self.api_url}/admin/version", timeout=timeout) as response:
                    response.read()
                return
            if time.monotonic() > deadline:
                raise ServerError(
                    f"Prefect's temporary API server did not answer within {timeout:.0f} s{self._last_words()}. On a"
                    " busy machine its first start can take longer: set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
                    " higher, or PREFECT_API_URL to a running Prefect server."
                )
            time.sleep(0.05)

    @contextlib.contextmanager
    def settings(self):
        """Prefect settings for a run on this server.

        Without heartbeats: they let a long-lived server mark a flow run whose process died as crashed, but
        this server has no automation that would (its triggers are off); and Prefect joins its heartbeat thread
        at the end of every flow run, which sleeps in one-second steps (0.7 s of waiting measured at the end of a
        run).
        """
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url, "flows.heartbeat_frequency": None}):
            yield

    def _release_lease(self) -> None:
        if self._lease is not None:
            os.close(self._lease)  # the flock goes with the descriptor
            self._lease = None

    def stop(self) -> None:
        """This process is done with the server: a kept one is left to its idle time, an own one is stopped."""
        self._stopping = True
        if self.kept:
            self._release_lease()
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def prefect_version() -> str:
    import prefect

    return prefect.__version__


def take_lease(path: Path) -> int:
    """A shared lock on the kept server's lease file, held until the descriptor closes (or the process ends)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a server that has idled out stops
    return fd


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock on `path` for the block: one run at a time finds or launches the kept server."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def register(path: Path, record: dict) -> None:
    """Write the kept server's registration whole (a reader never sees half of it)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(record))
    os.replace(partial, path)


def registered_server(path: Path) -> dict | None:
    """The kept server registered at `path`, if its process still runs; a stale registration is removed."""
    try:
        record = json.loads(path.read_text())
        pid, port = int(record["pid"]), int(record["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if server_alive(pid, port):
        return record
    path.unlink(missing_ok=True)
    return None


def server_alive(pid: int, port: int) -> bool:
    """Whether process `pid` runs and is a Prefect server on `port` (not another process that has reused the pid,
    even one with that number among its arguments: a run would wait 90 s for it to answer, then fail)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: not ours
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            arguments = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat", "rb") as f:
            zombie = f.read().rpartition(b")")[2].split()[0] == b"Z"
    except OSError:  # not Linux: the pid alone
        return True
    return not zombie and str(port).encode() in arguments and b"prefect.server.api.server:create_app" in arguments


def wait_for_exit(pid: int) -> None:
    """Block until process `pid` (not a child of this one) ends."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux 5.3+, or already gone: poll
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def serve_at_low_priority(pid: int, niceness: int = 10) -> None:
    """Lower a ready server's CPU priority (every thread of it, and so the threads it starts later).

    Once it has booted (at full priority: a run waits for that), the server's work is bookkeeping that nobody
    waits for, and on a machine whose cores all run the U-Net it would take time from it: its event handling
    and idle polling measured about 9 % of a core through a 200-image run on 2 cores. At niceness 10 it takes
    what the generation leaves. Linux sets niceness per thread, hence each of /proc/PID/task.
    """
    try:
        threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:  # not Linux: the process's own
        threads = [pid]
    for thread in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + niceness))
        except OSError:  # a thread that has ended
            pass


def database_file(settings) -> str:
    """The server's SQLite file (the default database lives in PREFECT_HOME), for messages; else the URL's scheme."""
    url = settings.server.database.connection_url
    url = url.get_secret_value() if url else ""
    if url.startswith("sqlite"):
        return url.partition(":///")[2] or url
    return f"the {url.partition(':')[0] or 'configured'} database"


def check_home(home: Path, database: str) -> None:
    """Fail at once, naming PREFECT_HOME, if the server could not keep its database there (it would exit with code 3)."""
    folder = Path(database).parent if database.startswith("/") else home
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK | os.X_OK)
    except OSError:
        writable = False
    if not writable:
        raise ServerError(
            f"Prefect's temporary API server cannot keep its database in {folder}: the folder is not writable. Set"
            " PREFECT_HOME to a writable folder (or PREFECT_API_URL to a running Prefect server)."
        )


_running: list[TemporaryServer] = []  # this process's server: in-process callers of the CLI reuse it


def start_temporary_server() -> TemporaryServer | None:
    """Start (or find kept) Prefect's server for this run now, unless a server is configured (PREFECT_API_URL).

    One per process, as Prefect's own: a second run in the same process finds it running.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    # The temporary server lives for this one run and serves no UI, so nothing can subscribe to its event
    # stream, and automations cannot act within its lifetime: its consumers for those (the event distributor,
    # triggers and actions) would only take CPU from the U-Net: measured idle, the server's CPU drops from
    # 4.4 % to 1.8 % of a core without them. Events are still stored and task runs recorded.
    for name in ("PREFECT_SERVER_EVENTS_STREAM_OUT_ENABLED", "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED"):
        os.environ.setdefault(name, "false")
    # It listens on loopback: a proxy from the environment (HTTP_PROXY, as on many clusters) must not carry
    # the calls to it away, Prefect's client's nor the readiness checks here.
    for name in ("NO_PROXY", "no_proxy"):
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1"]))
    if not _running or not _running[0].alive():
        _running[:] = [TemporaryServer(idle_seconds())]
    return _running[0]


def idle_seconds() -> float:
    """SDFLOW_SERVER_IDLE_SECONDS: how long a kept server outlives its last run; 0 for a server per run."""
    text = os.environ.get("SDFLOW_SERVER_IDLE_SECONDS", "").strip()
    try:
        seconds = float(text) if text else IDLE_SECONDS
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ServerError(
            f"SDFLOW_SERVER_IDLE_SECONDS={text!r} is not a number of seconds: set it to how long sdflow's Prefect"
            f" server waits for the next run ({IDLE_SECONDS:.0f} by default), or to 0 for a server per run."
        )
    return seconds
