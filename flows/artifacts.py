"""The run's Prefect artifacts: shard progress, the table of shards, contact sheets, a worker's progress line."""

from __future__ import annotations

import base64

from PIL import Image
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from nodes.dataset.commit import read_marker
from nodes.dataset.ingest import PromptPlan
from nodes.dataset.sheet import png_bytes
from nodes.dataset.store import write_file


class ShardReport:
    """A progress bar that advances as shards commit, then a table of the shards this run committed.

    A shard's rows may have been committed first by another run writing the same rows to the same output (its
    commit then finds them "already committed"): the marker in storage says which run that was.
    """

    def __init__(self, plan: PromptPlan, fs, root: str, run_id: str):
        self.total = len(plan.shards)
        self.fs, self.root, self.run_id = fs, root, run_id
        self.markers: list[dict] = []  # the committed marker of each of the plan's shards, as stored
        self.progress = create_progress_artifact(0.0, key="sdflow-shards", description=self._line()) if self.total else None

    @property
    def written(self) -> list[dict]:
        """The markers of the shards this run committed."""
        return [m for m in self.markers if m.get("run") == self.run_id]

    @property
    def rows_by_others(self) -> int:
        return sum(m["rows"] for m in self.markers if m.get("run") != self.run_id)

    def _line(self) -> str:
        rows = sum(m["rows"] for m in self.markers)
        return f"{len(self.markers)}/{self.total} shards committed, {rows} images"

    def committed(self, shard_or_marker) -> None:
        """Record a committed shard: a marker (in-process runs), or a Shard whose marker a worker wrote."""
        marker = shard_or_marker
        if not isinstance(marker, dict):
            marker = read_marker(self.fs, self.root, shard_or_marker.index)
        elif marker.get("outcome") == "already committed":  # the stored marker says whose commit it is
            marker = read_marker(self.fs, self.root, marker["shard"])
        self.markers.append(marker)
        update_progress_artifact(self.progress, 100.0 * len(self.markers) / self.total, self._line())

    def publish(self) -> None:
        if not self.written:
            return
        columns = ("shard", "rows", "failed", "device", "worker", "images_per_second", "seconds", "model_loads")
        table = [
            {c: (len(m["failed"]) if c == "failed" else m.get(c)) for c in columns}
            for m in sorted(self.written, key=lambda m: m["shard"])
        ]
        create_table_artifact(table, key="sdflow-shard-table", description=f"{len(table)} shards committed by this run")


def publish_contact_sheet(fs, path: str, sheet: Image.Image, key: str, header: str, description: str) -> None:
    """Write the contact sheet to `path` and publish it, embedded, in a markdown artifact under `header`."""
    data = png_bytes(sheet)
    write_file(fs, path, data)
    embedded = base64.b64encode(data).decode()
    markdown = f"{header}\n![contact sheet](data:image/png;base64,{embedded})\n\nFull size: `{fs.unstrip_protocol(path)}`\n"
    create_markdown_artifact(markdown, key=key, description=description)


def status_line(worker: str, device, done: int, total: int, seconds: float, failed: int = 0) -> str:
    """A shard run's progress report: worker, device, rows done, failures, images per second."""
    rate = done / seconds if seconds > 0 else 0.0
    return f"{worker} | {device} | {done}/{total} rows | {failed} failed | {rate:.2f} images/s"
