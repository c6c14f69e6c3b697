"""The temporary Prefect API server of one CLI run: Prefect's own server app, launched without importing it here.

With no PREFECT_API_URL, Prefect would start this server itself (its `SubprocessASGIServer`) at the flow's
first API call, after every import. The CLI starts it first, so that its seconds of boot overlap torch's
and diffusers' imports. It does not use `SubprocessASGIServer` for that: importing that class imports the
whole server (FastAPI routes, SQLAlchemy models) into this process, 2.3 s of Python measured here, which
holds the GIL against the main thread's imports, so the boot never really overlapped them. Launched with
the same command and environment, the server does all of that in its own process, on the other core.
"""

from __future__ import annotations

import atexit
import contextlib
import os
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
# of the same user (/proc/PID/environ) for its whole life.
PRIVATE_ENV = ("SDFLOW_STORAGE_OPTIONS",)
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
    """Prefect's API server (`prefect.server.api.server:create_app` under uvicorn) for this process's run."""

    def __init__(self) -> None:
        import prefect
        from prefect.settings import get_current_settings

        settings = get_current_settings()
        self.database = database_file(settings)
        check_home(Path(settings.home), self.database)
        self.app_dir = str(Path(prefect.__file__).parent.parent)
        # As SubprocessASGIServer: no UI, the server knows it is ephemeral, and it gets this process's settings.
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in PRIVATE_ENV},
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **settings.to_environment_variables(exclude_unset=True),
        }
        self.port = free_port()
        self.log = tempfile.TemporaryFile()  # its stderr: read for the cause when it fails, kept off the terminal
        self._stopping = False
        self.on_lost: Callable[[str], None] | None = None  # called (from a thread) if it dies after it was ready
        self.process = self._launch()
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

    def _launch(self) -> subprocess.Popen:
        command = [sys.executable, "-c", WATCH_PARENT, "--app-dir", self.app_dir, "--factory"]
        command += ["prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--log-level", "error", "--lifespan", "on"]
        return subprocess.Popen(
            command, env=self.env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, start_new_session=True
        )

    def wait(self) -> None:
        """Return once the server is ready; raise if it exited or did not answer in time."""
        self._ready.wait()
        if self._failure:
            raise self._failure

    def _await_ready(self, timeout: float) -> None:
        try:
            self._poll(timeout)
            serve_at_low_priority(self.process.pid)
        except Exception as e:  # for wait() to raise in the main thread
            self._failure = e
            return
        finally:
            self._ready.set()
        code = self.process.wait()  # then watch it: a run cannot go on without its server
        if not self._stopping and self.on_lost:
            self.on_lost(
                f"Prefect's temporary API server (pid {self.process.pid}) exited with code {code} in the middle of the"
                f" run{self._last_words()}. The shards committed so far are kept: run the same command again to finish."
            )

    def _last_words(self) -> str:
        """The last line the server wrote, as a clause ("" if none): its own account of why it stopped."""
        self.log.seek(0, os.SEEK_END)
        self.log.seek(max(0, self.log.tell() - 4096))
        lines = [line.strip() for line in self.log.read().decode(errors="replace").splitlines() if line.strip()]
        return f" (its last words: {lines[-1][:300]})" if lines else ""

    def _startup_failure(self, code: int) -> ServerError:
        """Why the server exited before it was ready, with what fixes it."""
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")
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
        return ServerError(
            f"Prefect's temporary API server exited with code {code} before it was ready{self._last_words()}. Set"
            " PREFECT_API_URL to a running Prefect server to run without it."
        )

    def _poll(self, timeout: float) -> None:
        """Wait for the server's health check, then make its first API call.

        A fresh server's first API call took 0.3 s here (the next ones, milliseconds). The flow's client begins
        with this one (the API version check); made here, in the background, it overlaps torch's imports.
        """
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code == STARTUP_FAILURE and not free_port(self.port):  # the port was taken since it was chosen
                self.port = free_port()
                self.process = self._launch()
            elif code is not None:  # a failure that another port would not mend: its log says which
                raise self._startup_failure(code)
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
        this server dies with the process; and Prefect joins its heartbeat thread at the end of every flow
        run, which sleeps in one-second steps (0.7 s of waiting measured at the end of a run).
        """
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url, "flows.heartbeat_frequency": None}):
            yield

    def stop(self) -> None:
        self._stopping = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


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
    """Start Prefect's temporary server for this run now, unless a server is configured (PREFECT_API_URL).

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
    if not _running or _running[0].process.poll() is not None:
        _running[:] = [TemporaryServer()]
    return _running[0]
