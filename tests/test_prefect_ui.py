"""What Prefect's UI shows of a normal run (no -v): sdflow's messages in the run's logs, task runs named by shard and batch."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.support.tables import write_table

OPEN = "a red circle (and a blue square"  # a bracket never closed: a row warning, cheaply
ROWS = [{"id": "first", "prompt": "a red circle"}, {"id": "open", "prompt": OPEN}, {"id": "third", "prompt": "a blue square"}]
WARNING = "row 'open': prompt has 1 unclosed bracket(s), which weight the rest of it, as in AUTOMATIC1111; close them, or write \\( and \\[ for the characters"
STAGES = ("generate-batch",)  # one task run per batch; --stage-tasks adds one per stage (below)


@pytest.fixture(scope="module")
def quiet_run(prefect_api, tiny_model, tmp_path_factory):
    """`sdflow generate` as a user runs it (a fresh process, no -v), logging to the API; its stderr, flow run, logs, task runs."""
    return cli_run(prefect_api, tiny_model, tmp_path_factory.mktemp("quiet-run"), ROWS, STAGES)


def cli_run(prefect_api, tiny_model, root, rows, stages, *options):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort, LogSort

    table = write_table(root / "t.parquet", rows)
    out = str(root / "out")
    # The test session turns logging to the API off for speed; a user's run has it on.
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_LOGGING_TO_API_ENABLED": "true"}
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "generate", table, out, "--model", tiny_model, "--steps", "1",
         "--batch-size", "1", "--shard-size", "2", *options],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    shards = (len(rows) + 1) // 2
    with get_client(sync_client=True) as client:
        # The session's server holds every test's runs: look among the newest.
        recent = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=20)
        run = next(r for r in recent if r.parameters.get("out") == out)
        runs = FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        for _ in range(100):  # the server records task runs from their events, a moment after they arrive
            tasks = client.read_task_runs(flow_run_filter=runs)
            if len(tasks) == 2 + len(rows) * len(stages) + shards:  # plan, load; each batch's; the shard writes
                break
            time.sleep(0.1)
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])), sort=LogSort.TIMESTAMP_ASC)
    return done.stderr, run, logs, {t.id: t.name for t in tasks}


def test_console_stays_quiet_while_sdflows_messages_reach_the_runs_logs(quiet_run):
    stderr, run, logs, task_names = quiet_run
    # The console: the row's warning and the summary, nothing of Prefect's.
    lines = stderr.splitlines()
    assert len(lines) == 2, stderr
    assert lines[0] == f"sdflow: WARNING: {WARNING}"
    assert lines[1].startswith("sdflow: wrote 3 images in 2 shard(s) to "), stderr

    where = lambda log: task_names.get(log.task_run_id, "flow run")  # noqa: E731
    records = [(where(log), log.name, log.level, log.message) for log in logs]
    # sdflow's own records, at INFO and WARNING, in the task runs that logged them.
    loaded = [r for r in records if r[1] == "sdflow" and r[3].startswith("loaded ")]
    assert len(loaded) == 1 and loaded[0][0].startswith("load-model") and loaded[0][2] == 20, records
    warned = [r for r in records if r[1] == "sdflow" and r[2] == 30]
    assert warned == [
        ("generate-batch-shard-00000-batch-01", "sdflow", 30, WARNING)
    ], records
    # The summary, in the flow run itself, just before Prefect's last word on it.
    flow_records = [r[3] for r in records if r[0] == "flow run"]
    assert flow_records[0].startswith("Beginning flow run"), flow_records
    assert flow_records[-2] == lines[1].removeprefix("sdflow: "), flow_records
    assert flow_records[-1] == "Finished in state Completed()"
    # Not Prefect's INFO record of every task run ("Finished in state Completed()"): the UI shows their states.
    assert not [r for r in records if r[1] == "prefect.task_runs" and r[2] < 30], records


def test_task_runs_are_named_by_shard_and_batch(quiet_run):
    task_names = set(quiet_run[3].values())
    batches = [(0, 0), (0, 1), (1, 0)]  # 3 rows, shards of 2, batches of 1
    named = {f"{stage}-shard-{shard:05d}-batch-{batch:02d}" for stage in STAGES for shard, batch in batches}
    assert named | {"write-shard-00000", "write-shard-00001"} <= task_names, sorted(task_names)
    others = sorted(task_names - named - {"write-shard-00000", "write-shard-00001"})
    assert [name.rsplit("-", 1)[0] for name in others] == ["load-model", "plan-prompt-table"], others


def test_stage_tasks_make_each_stage_of_each_batch_a_task_run(prefect_api, tiny_model, tmp_path):
    """--stage-tasks: a per-stage timeline, each stage's run named by its batch; without it, only the batches."""
    stages = ("generate-batch", "encode-prompts", "prepare-latents", "denoise", "decode-latents")
    stderr, run, logs, task_names = cli_run(prefect_api, tiny_model, tmp_path, ROWS[:1], stages, "--stage-tasks")
    named = {f"{stage}-shard-00000-batch-00" for stage in stages}
    assert named | {"write-shard-00000"} <= set(task_names.values()), sorted(task_names.values())
    assert len(task_names) == 2 + len(stages) + 1, sorted(task_names.values())
