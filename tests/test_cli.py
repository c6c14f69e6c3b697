"""The `sdflow` command: bad input gets one paragraph and exit code 2, never a traceback or a partial dataset."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.support.runs import processes_with_env, assert_clean_failure, run_cli
from tests.support.tables import write_table

GOOD = [{"id": i, "prompt": f"a red circle {i}"} for i in range(3)]


@pytest.fixture
def broken_weights_model(tiny_model, tmp_path) -> Path:
    """The tiny model with a corrupt U-Net weight file: its configs read fine, loading it fails."""
    model = tmp_path / "broken-model"
    shutil.copytree(tiny_model, model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    return model


def test_missing_prompt_column(prefect_api, tiny_model, tmp_path, capsys):
    table = write_table(tmp_path / "t.parquet", [{"caption": "a cat", "seed": 1}])
    code, err = run_cli(capsys, table, tmp_path / "out", "--model", tiny_model)
    assert_clean_failure(code, err, tmp_path / "out", "no 'prompt' column", "caption, seed")


def test_null_prompt_names_ids_before_the_model_loads(prefect_api, broken_weights_model, tmp_path, capsys):
    rows = GOOD + [{"id": 17, "prompt": None}, {"id": 23, "prompt": None}]
    table = write_table(tmp_path / "t.parquet", rows)
    code, err = run_cli(capsys, table, tmp_path / "out", "--model", broken_weights_model)
    # The table is checked before any weight is read: the broken U-Net is never reached.
    assert_clean_failure(code, err, tmp_path / "out", "'prompt'", "id 17, 23", "--skip-invalid")


def test_file_that_is_not_parquet(prefect_api, tiny_model, tmp_path, capsys):
    table = tmp_path / "prompts.parquet"
    table.write_text("prompt\na cat\n")
    code, err = run_cli(capsys, table, tmp_path / "out", "--model", tiny_model)
    assert_clean_failure(code, err, tmp_path / "out", "prompts.parquet is not a Parquet file")


@pytest.mark.parametrize("damage", ["missing", "no-unet-config", "bad-json"])
def test_unreadable_model_folder(prefect_api, tiny_model, tmp_path, capsys, damage):
    model = tmp_path / "model"
    if damage != "missing":
        shutil.copytree(tiny_model, model)
    if damage == "no-unet-config":
        (model / "unet" / "config.json").unlink()
    if damage == "bad-json":
        (model / "vae" / "config.json").write_text("{ not json")
    table = write_table(tmp_path / "t.parquet", GOOD)
    code, err = run_cli(capsys, table, tmp_path / "out", "--model", model)
    expected = {
        "missing": "does not exist",
        "no-unet-config": "has no unet/config.json",
        "bad-json": "vae/config.json is not valid JSON",
    }[damage]
    assert_clean_failure(code, err, tmp_path / "out", str(model), expected)


def test_model_weights_that_fail_to_load(prefect_api, broken_weights_model, tmp_path, capsys):
    table = write_table(tmp_path / "t.parquet", GOOD)
    code, err = run_cli(capsys, table, tmp_path / "out", "--model", broken_weights_model)
    assert_clean_failure(code, err, tmp_path / "out", "cannot be loaded")


def test_bad_option_values(prefect_api, tiny_model, tmp_path, capsys):
    table = write_table(tmp_path / "t.parquet", GOOD)
    for args, phrase in [
        (["--scheduler", "karras9000"], "--scheduler 'karras9000' is not one of"),
        (["--width", "100"], "--width 100 is out of range"),
        (["--steps", "0"], "--steps 0 is out of range"),
        (["--storage-options", "{oops"], "not valid JSON"),
    ]:
        code, err = run_cli(capsys, table, tmp_path / "out", "--model", tiny_model, *args)
        assert_clean_failure(code, err, tmp_path / "out", phrase)


def test_long_prompts_are_encoded_whole_and_clip_skip_is_checked(prefect_api, tiny_model, tmp_path, capsys):
    rows = [{"id": "long-one", "prompt": "red " * 100}, {"id": "short", "prompt": "blue", "clip_skip": 1}]
    table = write_table(tmp_path / "t.parquet", rows)
    code, err = run_cli(capsys, table, tmp_path / "out", "--model", tiny_model, "--clip-skip", "1")
    assert code == 0, err
    assert "truncated" not in err and "wrote 2 images in 1 shard(s)" in err
    assert pq.read_table(tmp_path / "out" / "data").column("clip_skip").to_pylist() == [1, 1]
    # The tiny model's text encoder has 2 layers: skipping 2 would leave none, named with the row.
    code, err = run_cli(capsys, table, tmp_path / "out2", "--model", tiny_model, "--clip-skip", "2")
    assert code == 2 and "row 'long-one': clip_skip 2 is more than this model's text encoders allow (0 to 1" in err


def test_command_in_a_fresh_process(prefect_api, tiny_model, tmp_path):
    """The installed `sdflow` entry point: a real run, then bad input, as a user sees them."""
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    sdflow = [sys.executable, "-m", "flows.cli"]
    table = write_table(tmp_path / "t.parquet", GOOD)
    ok = subprocess.run(
        [*sdflow, "generate", table, str(tmp_path / "out"), "--model", tiny_model, "--scheduler", "dpmpp_2m"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "Traceback" not in ok.stderr
    assert "wrote 3 images" in ok.stderr
    assert pq.read_table(tmp_path / "out" / "data").num_rows == 3
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["parameters"]["scheduler"] == "dpmpp_2m"

    bad = write_table(tmp_path / "bad.parquet", [{"text": "x"}])
    failed = subprocess.run(
        [*sdflow, "generate", bad, str(tmp_path / "out2"), "--model", tiny_model],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert failed.returncode == 2
    assert failed.stderr.startswith("sdflow: error: prompt table") and "Traceback" not in failed.stderr
    assert failed.stdout == ""


SPY_ON_GENERATION = """
import gc, sys
import flows.cli, flows.generate
generate_shards = flows.generate.generate_shards
def spy(*args, **kwargs):
    print(f"collector enabled={gc.isenabled()} frozen={gc.get_freeze_count()}", file=sys.stderr)
    return generate_shards(*args, **kwargs)
flows.generate.generate_shards = spy
sys.argv[0] = "sdflow"
flows.cli.entry()
"""


def test_the_command_generates_with_the_collector_on_and_its_imports_frozen(prefect_api, tiny_model, tmp_path, capsys):
    """The command imports without the cyclic garbage collector (its walks of the imported modules cost seconds),
    then freezes those objects and turns it back on: a long run collects its garbage. In-process callers keep
    their collector as it was."""
    import gc

    table = write_table(tmp_path / "t.parquet", GOOD)
    done = subprocess.run(
        [sys.executable, "-c", SPY_ON_GENERATION, "generate", table, str(tmp_path / "out"), "--model", tiny_model],
        env={**os.environ, "PREFECT_API_URL": prefect_api}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    state = re.search(r"collector enabled=(\w+) frozen=(\d+)", done.stderr)
    assert state and state[1] == "True" and int(state[2]) > 100_000, done.stderr
    frozen = gc.get_freeze_count()
    code, err = run_cli(capsys, table, tmp_path / "out2", "--model", tiny_model)
    assert code == 0, err
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_command_on_its_own_temporary_prefect_server(tiny_model, tmp_path):
    """With no PREFECT_API_URL, the command runs its flow on a Prefect server of its own, recorded in PREFECT_HOME.

    An HTTP proxy in the environment (here a closed port) must not carry the calls to that loopback server away.
    """
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.update(HTTP_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
    table = write_table(tmp_path / "t.parquet", GOOD)
    ok = subprocess.run(
        [sys.executable, "-m", "flows.cli", "generate", table, str(tmp_path / "out"), "--model", tiny_model],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "wrote 3 images" in ok.stderr and "Traceback" not in ok.stderr
    with sqlite3.connect(home / "prefect.db") as db:
        runs = db.execute(
            "SELECT flow.name, flow_run.state_type FROM flow_run JOIN flow ON flow.id = flow_run.flow_id"
        ).fetchall()
        tasks = db.execute("SELECT name, state_type FROM task_run").fetchall()
    assert runs == [("generate-dataset", "COMPLETED")]
    # Every task run reached the server before it stopped (3 rows: one batch, one shard).
    # Named by shard and batch (generate-batch-shard-00000-batch-00, write-shard-00000), or Prefect's random suffix.
    stages = {re.sub(r"(-shard-\d{5}-batch-\d+|-\d{5}|-[0-9a-f]{3})$", "", name): state for name, state in tasks}
    assert stages == {
        stage: "COMPLETED"
        for stage in ("plan-prompt-table", "load-model", "generate-batch", "write-shard")
    }, tasks
    assert processes_with_env(f"PREFECT_HOME={home}") == [], "the temporary server must stop with the command"


def test_pickle_checkpoints_need_an_explicit_opt_in(prefect_api, tiny_model, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model, model)
    UNet2DConditionModel.from_pretrained(model / "unet").save_pretrained(model / "unet", safe_serialization=False)
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    table = write_table(tmp_path / "t.parquet", GOOD[:1])
    code, err = run_cli(capsys, table, tmp_path / "out", "--model", model, "--steps", "1")
    assert_clean_failure(code, err, tmp_path / "out", "not in safetensors", "--allow-pickle")
    code, err = run_cli(capsys, table, tmp_path / "out", "--model", model, "--steps", "1", "--allow-pickle")
    assert code == 0, err
    assert "pickle checkpoints allowed" in err


def test_ids_cannot_steer_where_files_go(prefect_api, tiny_model, tmp_path, capsys):
    """Ids are values, never parts of a key: hostile ones land in the dataset like any other."""
    ids = ["../../escape", "/etc/passwd", "..", "a/b\\c", "C:\\x"]
    table = write_table(tmp_path / "t.parquet", [{"id": i, "prompt": "a cat"} for i in ids])
    code, err = run_cli(capsys, table, tmp_path / "out", "--model", tiny_model, "--steps", "1")
    assert code == 0, err
    assert sorted(pq.read_table(tmp_path / "out" / "data").column("id").to_pylist()) == sorted(ids)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    written = [re.sub(r"-[0-9a-f]{32}(?=\.parquet$)", "", w) for w in written]  # the attempt's own data file
    assert written == [
        "out/_index/00000.npz", "out/_shards/00000.json", "out/contact_sheet.png", "out/data/part-00000.parquet",
        "out/manifest.json", "t.parquet",
    ]


def test_summary_says_what_a_rerun_did(prefect_api, tiny_model, tmp_path, capsys):
    table = write_table(tmp_path / "t.parquet", GOOD)
    out = tmp_path / "out"
    assert run_cli(capsys, table, out, "--model", tiny_model, "--steps", "1")[0] == 0
    code, err = run_cli(capsys, table, out, "--model", tiny_model, "--steps", "1")
    assert code == 0 and "wrote 0 images" in err and "3 row(s) were already done" in err
    code, err = run_cli(capsys, table, out, "--model", tiny_model, "--steps", "2")
    assert code == 0 and "wrote 3 images" in err
    assert "3 row(s) from earlier runs with other parameters or another model stay in the dataset" in " ".join(err.split())


def test_summary_counts_only_the_shards_this_run_wrote(prefect_api, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    first = write_table(tmp_path / "t.parquet", GOOD)
    assert run_cli(capsys, first, out, "--model", tiny_model, "--steps", "1", "--shard-size", "1")[0] == 0
    grown = write_table(tmp_path / "t2.parquet", GOOD + [{"id": 3, "prompt": "a blue star"}])
    code, err = run_cli(capsys, grown, out, "--model", tiny_model, "--steps", "1", "--shard-size", "1")
    assert code == 0, err
    assert "wrote 1 images in 1 shard(s)" in err, err  # the dataset holds 4 shards; this run wrote one


def own_server_env(home: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return env


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["missing.parquet", "out"], "prompt table missing.parquet does not exist"),
        (["t.parquet", "out", "--scheduler", "karras9000"], "--scheduler 'karras9000' is not one of"),
        (["t.parquet", "out", "--model", "./no-such-model"], "model ./no-such-model does not exist"),
        (["t.parquet", "out", "--pool", "gpus"], "--pool needs a Prefect server that the pool's workers also reach"),
    ],
    ids=["missing-table", "unknown-scheduler", "missing-model", "pool-without-api-url"],
)
def test_input_errors_are_reported_before_and_without_the_server(tmp_path, args, phrase):
    write_table(tmp_path / "t.parquet", GOOD)
    home = tmp_path / "prefect-home"
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "generate", *args], cwd=tmp_path, env=own_server_env(home),
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("sdflow: error: ") and "Traceback" not in done.stderr
    assert phrase in " ".join(done.stderr.split())
    assert not (home / "prefect.db").exists(), "the temporary server was started"
    assert not (tmp_path / "out").exists()


def test_unwritable_prefect_home_is_named(tmp_path):
    if os.geteuid() == 0:
        home = Path("/proc/sdflow-home")  # root writes anywhere a mode allows: /proc refuses it too
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        home = locked / "home"
    table = write_table(tmp_path / "t.parquet", GOOD)
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "generate", table, str(tmp_path / "out")],
        env=own_server_env(home), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("sdflow: error: ") and "Traceback" not in done.stderr
    assert "PREFECT_HOME" in done.stderr and str(home) in done.stderr


def test_slow_server_start_names_the_setting(tiny_model, tmp_path):
    from flows.server import STARTUP_TIMEOUT

    assert STARTUP_TIMEOUT >= 60  # Prefect's 20 s was measured too short on a busy machine
    table = write_table(tmp_path / "t.parquet", GOOD)
    home = tmp_path / "prefect-home"
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "generate", table, str(tmp_path / "out"), "--model", tiny_model],
        env=own_server_env(home, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1"),
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    text = " ".join(done.stderr.split())
    assert "did not answer within 1 s" in text and "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in text
    assert "Traceback" not in done.stderr
    assert processes_with_env(f"PREFECT_HOME={home}") == []


def test_storage_options_never_reach_the_temporary_server(tiny_model, tmp_path):
    home = tmp_path / "prefect-home"
    table = write_table(tmp_path / "t.parquet", GOOD)
    secret = "sdflow-test-secret-7f3a"
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "generate", table, str(tmp_path / "out"), "--model", tiny_model,
         "--storage-options", json.dumps({"secret_key": secret})],
        env=own_server_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    environs, niceness = [], []
    while process.poll() is None and not environs:
        for pid in processes_with_env(f"PREFECT_HOME={home}"):
            if pid != process.pid:
                environs.append(Path(f"/proc/{pid}/environ").read_bytes())
    while process.poll() is None:  # and, while it serves the run, its priority
        for pid in processes_with_env(f"PREFECT_HOME={home}"):
            try:
                if pid != process.pid:
                    niceness.append(int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16]))
            except (OSError, IndexError):
                pass
        time.sleep(0.05)
    err = process.communicate(timeout=300)[1]
    assert process.returncode == 0, err
    assert environs, "the server was not seen"
    assert secret.encode() not in environs[0] and b"SDFLOW_STORAGE_OPTIONS" not in environs[0]
    # The server's bookkeeping yields the CPU to generation: niceness 10 above the command's, for its whole run.
    assert niceness and niceness[-1] == min(19, os.nice(0) + 10), niceness


def test_an_error_raised_while_a_stop_signal_unwinds_the_run_is_reported_as_the_stop(tiny_model, tmp_path, capsys, monkeypatch):
    """A library that catches the interrupt and raises an error of its own (not chained to it) must not turn a
    SIGTERM into "a bug": exit 143 and the stop's one line, as for any stop."""
    import signal

    import flows.cli

    def generate(args, server):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises in this thread, at once
            time.sleep(5)
        except BaseException:
            pass
        raise TypeError("Got unexpected argument type <class 'str'> for compute function")

    monkeypatch.setattr(flows.cli, "generate", generate)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # no server is started; none is reached
    code = flows.cli.main(["generate", write_table(tmp_path / "t.parquet", GOOD), str(tmp_path / "out"), "--model", tiny_model])
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM, err
    assert err == "sdflow: error: stopped by SIGTERM; the shards committed so far are kept: rerun to finish.\n"
