"""Input and output on S3, against a real S3 HTTP endpoint on loopback (moto's server mode).

Nothing is patched: the flow builds its own s3fs filesystems from URLs, exactly as in production, and
reaches the server through AWS_ENDPOINT_URL (botocore's standard variable, which aiobotocore and so s3fs
honour) or through SDFLOW_STORAGE_OPTIONS / --storage-options with an explicit endpoint.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from PIL import Image

from nodes.errors import ModelError, PromptTableError, SdflowError, StorageError
from nodes.shapes.builders import TOY_WORDS

from tests.support.tables import write_table
from tests.support.s3_server import BUCKET, upload_table

BATCH_SIZE = 4
SHARD_SIZE = 4
STEPS = 2  # storage is under test here, not sampling: as few U-Net calls as will do (2 CPU cores)

# 8 rows, 2 shards of 4: ids are not positions, some rows carry their own seed and size, one column is
# carried through untouched.
ROWS = [
    {"id": 100 + i, "prompt": f"a {TOY_WORDS[10 + i]} circle", "seed": (1000 + i if i % 2 else None), "tag": f"t{i}"}
    for i in range(8)
]
ROWS[5].update(width=48, height=32)  # one row of another size: its own batch, its own PNG size
for row in ROWS:
    row.setdefault("width", None)
    row.setdefault("height", None)
NATIVE = 64  # the tiny model's images are 64x64


@pytest.fixture
def s3_prompts(s3, tmp_path) -> str:
    """The whole prompt table at s3://BUCKET/prompts.parquet."""
    return upload_table(s3, tmp_path, ROWS, "prompts.parquet")


@pytest.fixture
def s3_small_prompts(s3, tmp_path) -> str:
    """Its first two rows, for tests where the images do not matter (2 CPU cores: keep U-Net calls few)."""
    return upload_table(s3, tmp_path, ROWS[:2], "small.parquet")


@pytest.fixture(scope="module")
def local_reference(prefect_api, tiny_model, tmp_path_factory):
    """The same run written to a local folder: its manifest and images by id, what S3 runs must match."""
    from flows.generate import generate_dataset

    folder = tmp_path_factory.mktemp("s3-reference")
    prompts = write_table(folder / "prompts.parquet", ROWS)
    out = folder / "out"
    manifest = generate_dataset(
        prompts=prompts, out=str(out), model=tiny_model, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE, steps=STEPS
    )
    tables = [pq.read_table(out / s["file"]) for s in manifest["shards"]]
    return manifest, images_by_id(tables)


@pytest.fixture
def isolated_cli(monkeypatch):
    """Undo what flows.cli.main does to the process: env defaults it sets and the 'sdflow' logger's setup."""
    for name in (
        "PREFECT_SERVER_ANALYTICS_ENABLED",
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "TRANSFORMERS_VERBOSITY",
        "PREFECT_LOGGING_LEVEL",
        "PREFECT_LOGGING_SERVER_LEVEL",
        "SDFLOW_STORAGE_OPTIONS",
    ):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # records the original value, or its absence
        if name not in os.environ or not os.environ[name]:
            monkeypatch.delenv(name)
    log = logging.getLogger("sdflow")
    saved = (list(log.handlers), log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]


# ----------------------------------------------------------------------------------------------- helpers


def images_by_id(tables) -> dict:
    """Decoded images of output shards as {id: uint8 array (H, W, 3)}."""
    out = {}
    for table in tables:
        for row_id, image in zip(table.column("id").to_pylist(), table.column("image").to_pylist()):
            out[row_id] = np.asarray(Image.open(io.BytesIO(image["bytes"])).convert("RGB"))
    return out


def read_s3_dataset(fs: s3fs.S3FileSystem, root: str) -> tuple[dict, list]:
    """The manifest and shard tables of a dataset on S3, read through the test's own client."""
    manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
    tables = [pq.read_table(io.BytesIO(fs.cat_file(f"{root}/{s['file']}"))) for s in manifest["shards"]]
    return manifest, tables


def assert_same_images(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for row_id, pixels in want.items():
        assert got[row_id].shape == pixels.shape, row_id
        diff = np.abs(got[row_id].astype(np.int16) - pixels.astype(np.int16)).max()
        assert diff <= 1, f"row {row_id}: images differ by up to {diff} levels"


def expected_size(row: dict) -> tuple[int, int]:
    """(width, height) of a row's image, as PIL reports it."""
    return (row["width"] or NATIVE, row["height"] or NATIVE)


# ------------------------------------------------------------------------------------------------- tests


def test_s3_input_and_output_match_a_local_run(s3, s3_prompts, local_reference, prefect_api, tiny_model):
    from flows.generate import generate_dataset

    out = f"s3://{BUCKET}/out"
    returned = generate_dataset(
        prompts=s3_prompts, out=out, model=tiny_model, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE, steps=STEPS
    )

    manifest, tables = read_s3_dataset(s3, f"{BUCKET}/out")
    assert manifest["shards"] == returned["shards"]
    assert [re.sub("-[0-9a-f]{32}", "", s["file"]) for s in manifest["shards"]] == ["data/part-00000.parquet", "data/part-00001.parquet"]
    assert [s["rows"] for s in manifest["shards"]] == [SHARD_SIZE, SHARD_SIZE]
    # Exactly the shards, their markers and the manifest: no temporary or stray objects beside them.
    assert sorted(s3.find(f"{BUCKET}/out")) == sorted(
        [f"{BUCKET}/out/manifest.json", f"{BUCKET}/out/{manifest['contact_sheet']}"]
        + [f"{BUCKET}/out/{s['file']}" for s in manifest["shards"]]
        + [f"{BUCKET}/out/_shards/{s['shard']:05d}.json" for s in manifest["shards"]]
        + [f"{BUCKET}/out/{manifest['index']}"]
    )
    assert (manifest["rows"]["in_dataset"], manifest["rows"]["generated"]) == (len(ROWS), len(ROWS))
    assert manifest["parameters"]["prompts"] == s3_prompts and manifest["parameters"]["out"] == out

    # Every row, in table order, with its carried column and a PNG of its own size.
    assert sum(t.num_rows for t in tables) == len(ROWS)
    rows = [r for t in tables for r in t.to_pylist()]
    assert [r["id"] for r in rows] == [r["id"] for r in ROWS]
    assert [r["tag"] for r in rows] == [r["tag"] for r in ROWS]
    for row, want in zip(rows, ROWS):
        png = row["image"]["bytes"]
        assert png.startswith(b"\x89PNG\r\n\x1a\n"), row["id"]
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size == expected_size(want), row["id"]
        assert (row["width"], row["height"]) == expected_size(want)
    assert tables[0].schema.metadata[b"huggingface"]  # `datasets` decodes the image column

    # The key check: the store changes nothing about the images.
    reference_manifest, reference_images = local_reference
    assert [s["rows"] for s in reference_manifest["shards"]] == [s["rows"] for s in manifest["shards"]]
    assert manifest["resolved"] == reference_manifest["resolved"]
    assert_same_images(images_by_id(tables), reference_images)


def test_model_read_from_s3_is_cached_locally_and_generates(
    s3, local_reference, prefect_api, tiny_model, tmp_path, monkeypatch
):
    from flows.generate import generate_dataset

    # The first shard's rows only: one batch, batched exactly as in the reference run.
    first = upload_table(s3, tmp_path, ROWS[:SHARD_SIZE], "first.parquet")
    cache = tmp_path / "sdflow-cache"
    monkeypatch.setenv("SDFLOW_CACHE", str(cache))
    s3.put(tiny_model.rstrip("/") + "/", f"{BUCKET}/models/tiny/", recursive=True)
    assert s3.exists(f"{BUCKET}/models/tiny/model_index.json")
    model_url = f"s3://{BUCKET}/models/tiny"

    manifest = generate_dataset(
        prompts=first, out=f"s3://{BUCKET}/out-s3-model", model=model_url,
        batch_size=BATCH_SIZE, shard_size=SHARD_SIZE, steps=STEPS,
    )

    # One complete local copy, laid out as the original folder (not nested one level down).
    copies = [p for p in (cache / "models").iterdir() if p.is_dir()]
    assert len(copies) == 1, copies
    copy = copies[0]
    assert (copy / ".complete").exists()
    original = sorted(str(p.relative_to(tiny_model)) for p in Path(tiny_model).rglob("*") if p.is_file())
    copied = sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file() and p.name != ".complete")
    assert copied == original

    reference_manifest, reference_images = local_reference
    # Same configs and weight files, so the same fingerprint and the same images as the local model.
    assert manifest["resolved"]["model_fingerprint"] == reference_manifest["resolved"]["model_fingerprint"]
    assert manifest["parameters"]["model"] == model_url
    _, tables = read_s3_dataset(s3, f"{BUCKET}/out-s3-model")
    assert manifest["rows"]["generated"] == SHARD_SIZE
    assert set(t for table in tables for t in table.column("model").to_pylist()) == {model_url}
    first_ids = [r["id"] for r in ROWS[:SHARD_SIZE]]
    assert_same_images(images_by_id(tables), {i: reference_images[i] for i in first_ids})


def test_missing_prompt_table_on_s3_names_the_url(s3, prefect_api, tiny_model):
    from flows.generate import generate_dataset

    url = f"s3://{BUCKET}/no-such-prompts.parquet"
    with pytest.raises(PromptTableError, match=re.escape(url)):
        generate_dataset(prompts=url, out=f"s3://{BUCKET}/out-missing", model=tiny_model)
    assert not s3.find(f"{BUCKET}/out-missing")  # nothing written for a run that could not start


def test_prompt_table_in_a_missing_bucket_names_the_url(s3, prefect_api, tiny_model):
    from flows.generate import generate_dataset

    url = "s3://no-such-bucket-prompts/prompts.parquet"
    with pytest.raises(PromptTableError, match=re.escape(url)):
        generate_dataset(prompts=url, out=f"s3://{BUCKET}/out-missing", model=tiny_model)


def test_missing_model_on_s3_names_the_url(s3, prefect_api, s3_small_prompts, tmp_path, monkeypatch):
    from flows.generate import generate_dataset

    monkeypatch.setenv("SDFLOW_CACHE", str(tmp_path / "cache"))
    url = f"s3://{BUCKET}/models/none"
    with pytest.raises(ModelError, match=re.escape(url)):
        generate_dataset(prompts=s3_small_prompts, out=f"s3://{BUCKET}/out-no-model", model=url)
    assert not list((tmp_path / "cache").rglob(".complete"))  # no half-made copy marked as complete


def test_output_with_files_of_other_origins_on_s3_is_refused(s3, s3_small_prompts, prefect_api, tiny_model):
    from flows.generate import generate_dataset

    s3.pipe_file(f"{BUCKET}/taken/data/theirs.parquet", b"{}")
    with pytest.raises(StorageError, match=re.escape(f"s3://{BUCKET}/taken") + ".*theirs.parquet"):
        generate_dataset(prompts=s3_small_prompts, out=f"s3://{BUCKET}/taken", model=tiny_model)
    assert s3.ls(f"{BUCKET}/taken", detail=False) == [f"{BUCKET}/taken/data"]  # untouched
    assert s3.cat_file(f"{BUCKET}/taken/data/theirs.parquet") == b"{}"


def test_output_to_a_missing_bucket_is_a_storage_error(s3, s3_small_prompts, prefect_api, tiny_model):
    from flows.generate import generate_dataset

    url = "s3://no-such-bucket-out/out"
    with pytest.raises(SdflowError, match=re.escape(url)):
        generate_dataset(prompts=s3_small_prompts, out=url, model=tiny_model, steps=1)


def test_cli_with_storage_options_and_s3_urls(
    s3, s3_env, s3_small_prompts, prefect_api, tiny_model, isolated_cli, monkeypatch, capsys
):
    from flows.cli import EXIT_INPUT, main

    # The endpoint comes only from --storage-options here: without it the client would go to AWS.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    s3fs.S3FileSystem.clear_instance_cache()
    options = json.dumps({"client_kwargs": {"endpoint_url": s3_env}})
    out = f"s3://{BUCKET}/cli-out"
    code = main(
        ["generate", s3_small_prompts, out, "--model", tiny_model, "--storage-options", options,
         "--shard-size", "1", "--steps", "1"]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"wrote 2 images in 2 shard(s) to {out}" in err
    manifest, tables = read_s3_dataset(s3, f"{BUCKET}/cli-out")
    assert [t.column("id").to_pylist() for t in tables] == [[ROWS[0]["id"]], [ROWS[1]["id"]]]
    assert s3_env not in json.dumps(manifest)  # storage options are never recorded as parameters

    missing = f"s3://{BUCKET}/cli-missing.parquet"
    code = main(["generate", missing, f"s3://{BUCKET}/cli-out-2", "--model", tiny_model, "--storage-options", options])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT, err
    assert missing in " ".join(err.split()), err


def test_cli_error_keeps_a_long_s3_url_whole(s3, s3_env, prefect_api, tiny_model, isolated_cli, capsys):
    from flows.cli import EXIT_INPUT, main

    bucket = "team-datasets-with-a-long-hyphenated-name"
    s3.mkdir(bucket)
    missing = f"s3://{bucket}/prompts/2026-11-21/prompt-table-of-the-week.parquet"
    code = main(["generate", missing, f"s3://{BUCKET}/never", "--model", tiny_model])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT, err
    assert missing in " ".join(err.split()), err  # whole, as the user typed it (line breaks only between words)


from tests.support.runs import RESUME_ROWS, run_killable as run_cli  # noqa: E402


@pytest.mark.parametrize("crash", ["denoise-step:6", "before-marker:2", "manifest"])
def test_sigkill_then_rerun_on_s3(s3, s3_env, prefect_api, tiny_model, resume_reference, tmp_path, crash):
    """The commit protocol against a real S3 endpoint: kill, rerun, every row once, nothing stray or unfinished."""
    _, want = resume_reference
    prompts = upload_table(s3, tmp_path, RESUME_ROWS, "resume.parquet")
    out = f"s3://{BUCKET}/resume"
    killed = run_cli(prefect_api, tiny_model, prompts, out, crash)
    assert killed.returncode == -9, killed.stderr
    s3.invalidate_cache()
    markers = s3.find(f"{BUCKET}/resume/_shards")
    committed_rows = sum(json.loads(s3.cat_file(p))["rows"] for p in markers)

    resumed = run_cli(prefect_api, tiny_model, prompts, out)
    assert resumed.returncode == 0, resumed.stderr
    s3.invalidate_cache()
    manifest = json.loads(s3.cat_file(f"{BUCKET}/resume/manifest.json"))
    assert manifest["rows"]["generated"] == len(RESUME_ROWS) - committed_rows
    assert sorted(s3.find(f"{BUCKET}/resume")) == sorted(
        [f"{BUCKET}/resume/manifest.json", f"{BUCKET}/resume/{manifest['contact_sheet']}"]
        + [f"{BUCKET}/resume/{s['file']}" for s in manifest["shards"]]
        + [f"{BUCKET}/resume/_shards/{s['shard']:05d}.json" for s in manifest["shards"]]
        + [f"{BUCKET}/resume/{manifest['index']}"]
    )
    assert s3.list_multipart_uploads(BUCKET) == []
    _, tables = read_s3_dataset(s3, f"{BUCKET}/resume")
    got = images_by_id(tables)
    assert sorted(got) == sorted(want)  # every row exactly once
    for row_id, pixels in want.items():
        assert np.abs(got[row_id].astype(int) - pixels.astype(int)).max() <= 1, row_id


def start_upload(s3, key: str, bucket: str = BUCKET) -> None:
    """Begin a multipart upload and send one part, then stop: what a process killed mid-upload leaves."""
    upload = s3.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    s3.call_s3("upload_part", Bucket=bucket, Key=key, PartNumber=1, UploadId=upload["UploadId"], Body=b"x" * 1024)


def test_unfinished_uploads_under_the_output_are_aborted(s3):
    from nodes.dataset.commit import clean_uncommitted

    ours = f"out/data/part-00003-{'0' * 32}.parquet"
    start_upload(s3, ours)
    start_upload(s3, "elsewhere/big.bin")  # not ours: left alone
    start_upload(s3, "outbox/data/part-00003.parquet")  # beside OUT, not under it: left alone
    start_upload(s3, "out/backup.tar")  # under OUT but not an sdflow name: left alone
    removed = clean_uncommitted(s3, f"{BUCKET}/out", set(), time.time() + 5)
    assert removed == [f"{BUCKET}/{ours} (unfinished upload)"]
    assert sorted(u["Key"] for u in s3.list_multipart_uploads(BUCKET)) == ["elsewhere/big.bin", "out/backup.tar", "outbox/data/part-00003.parquet"]


def test_run_and_cleanup_leave_other_applications_beside_the_output(s3, s3_small_prompts, prefect_api, tiny_model):
    """Objects and unfinished uploads of OUT+suffix, and every other upload in a bucket-root OUT's bucket, survive."""
    from flows.generate import generate_dataset

    s3.pipe_file(f"{BUCKET}/outbox/data/part-00000.parquet", b"theirs")
    start_upload(s3, "outbox/data/part-00001.parquet")
    start_upload(s3, f"out/data/part-00007-{'0' * 32}.parquet")  # ours, from a killed run: aborted
    generate_dataset(prompts=s3_small_prompts, out=f"s3://{BUCKET}/out", model=tiny_model, steps=1)
    assert s3.cat_file(f"{BUCKET}/outbox/data/part-00000.parquet") == b"theirs"
    assert [u["Key"] for u in s3.list_multipart_uploads(BUCKET)] == ["outbox/data/part-00001.parquet"]

    root = "sdflow-root-out"
    s3.mkdir(root)
    start_upload(s3, "backups/nightly.tar", bucket=root)  # another application's upload in the bucket
    manifest = generate_dataset(prompts=s3_small_prompts, out=f"s3://{root}", model=tiny_model, steps=1)
    assert manifest["rows"]["generated"] == 2
    assert [u["Key"] for u in s3.list_multipart_uploads(root)] == ["backups/nightly.tar"]


def test_bucket_root_with_other_objects_is_refused_and_untouched(s3, s3_small_prompts, prefect_api, tiny_model):
    from flows.generate import generate_dataset

    root = "sdflow-root-taken"
    s3.mkdir(root)
    s3.pipe_file(f"{root}/photos/cat.png", b"theirs")
    s3.pipe_file(f"{root}/manifest.json", b'{"app": "theirs"}')
    with pytest.raises(StorageError, match="photos/cat.png.*manifest.json"):
        generate_dataset(prompts=s3_small_prompts, out=f"s3://{root}", model=tiny_model, steps=1)
    assert sorted(s3.find(root)) == [f"{root}/manifest.json", f"{root}/photos/cat.png"]


def test_s3_out_with_pattern_characters_beside_a_sibling(s3, s3_small_prompts, prefect_api, tiny_model):
    from flows.generate import generate_dataset

    generate_dataset(prompts=s3_small_prompts, out=f"s3://{BUCKET}/runs/set1-a", model=tiny_model, steps=1, shard_size=1)
    sibling = {k: s3.cat_file(k) for k in s3.find(f"{BUCKET}/runs/set1-a")}
    out = f"s3://{BUCKET}/runs/set[1]*?"  # as a glob it matches runs/set1-a
    first = generate_dataset(prompts=s3_small_prompts, out=out, model=tiny_model, steps=1, shard_size=1)
    assert first["rows"]["generated"] == 2
    data = sorted(s3.find(f"{BUCKET}/runs/set[1]*?/data"))
    assert len(data) == 2
    again = generate_dataset(prompts=s3_small_prompts, out=out, model=tiny_model, steps=1, shard_size=1)
    assert (again["rows"]["generated"], again["rows"]["already_done"]) == (0, 2)
    s3.invalidate_cache()
    assert sorted(s3.find(f"{BUCKET}/runs/set[1]*?/data")) == data
    assert {k: s3.cat_file(k) for k in s3.find(f"{BUCKET}/runs/set1-a")} == sibling


def test_write_denied_output_is_refused_before_the_model_loads(s3, s3_small_prompts, prefect_api, tiny_model, monkeypatch):
    import flows.generate
    from flows.generate import generate_dataset

    monkeypatch.setattr(flows.generate, "load_components_task", lambda *a, **k: pytest.fail("model loaded"))
    bucket = "sdflow-read-only"
    s3.mkdir(bucket)
    deny = {"Effect": "Deny", "Principal": "*", "Action": ["s3:PutObject"], "Resource": f"arn:aws:s3:::{bucket}/*"}
    s3.call_s3("put_bucket_policy", Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [deny]}))
    with pytest.raises(StorageError, match=re.escape(f"s3://{bucket}/out") + ".*cannot be written"):
        generate_dataset(prompts=s3_small_prompts, out=f"s3://{bucket}/out", model=tiny_model, steps=1)


def test_credentials_appear_in_no_output_log_or_parameter(s3, s3_env, prefect_api, tiny_model, tmp_path, monkeypatch):
    """A sentinel secret passed as storage options is searched for everywhere a run leaves a trace."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    sentinel = "SENTINEL-5ecret-d0-not-leak"
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint comes only from the storage options: they must be used
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-this-one")
    s3fs.S3FileSystem.clear_instance_cache()
    prompts = upload_table(s3, tmp_path, RESUME_ROWS[:2], "secret.parquet")
    options = json.dumps({"key": "testing", "secret": sentinel, "client_kwargs": {"endpoint_url": s3_env}})
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_LOGGING_TO_API_ENABLED": "true", "PREFECT_LOGGING_LEVEL": "INFO"}
    run = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--verbose", "generate", prompts, f"s3://{BUCKET}/secret-out",
         "--model", tiny_model, "--steps", "1", "--storage-options", options],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert sentinel not in run.stdout + run.stderr
    s3.invalidate_cache()
    objects = s3.find(f"{BUCKET}/secret-out")
    assert len(objects) == 5  # manifest, one shard, its marker, the index, the contact sheet
    for key in objects:
        assert sentinel.encode() not in s3.cat_file(key), key
    with get_client(sync_client=True) as client:
        # Among the newest: the session's server holds every test's runs, more than one page of them.
        recent = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=20)
        [flow_run] = [r for r in recent if r.parameters.get("out") == f"s3://{BUCKET}/secret-out"]
        assert sentinel not in json.dumps(flow_run.model_dump(mode="json"))
        deadline = time.monotonic() + 30  # the server stores shipped logs asynchronously
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
            if logs or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert logs, "the run's logs reached the API"
        assert all(sentinel not in log.message for log in logs)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        assert task_runs and all(sentinel not in json.dumps(t.model_dump(mode="json")) for t in task_runs)
