"""deployments/prefect.yaml names a real flow with parameters that flow accepts."""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect.flows import load_flow_from_entrypoint

ROOT = Path(__file__).resolve().parents[1]


def test_every_deployment_points_at_a_flow_that_accepts_its_parameters():
    config = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    assert config["deployments"]
    for deployment in config["deployments"]:
        flow = load_flow_from_entrypoint(deployment["entrypoint"])  # what `prefect deploy` and workers use
        validated = flow.validate_parameters(deployment["parameters"])
        assert {k: validated[k] for k in deployment["parameters"]} == deployment["parameters"]
        for schedule in deployment.get("schedules", []):
            from prefect.client.schemas.schedules import CronSchedule

            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
