"""deployments/prefect.yaml names a real flow with parameters that flow accepts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_every_deployment_points_at_a_flow_that_accepts_its_parameters():
    config = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    assert config["deployments"]
    for deployment in config["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        spec = importlib.util.spec_from_file_location("entry", ROOT / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        flow = getattr(module, name)
        validated = flow.validate_parameters(deployment["parameters"])
        assert {k: validated[k] for k in deployment["parameters"]} == deployment["parameters"]
        for schedule in deployment.get("schedules", []):
            from prefect.client.schemas.schedules import CronSchedule

            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
