"""infra/ parses and points at real things: flow entrypoints that import, parameters the flow
takes, settings that exist, one Ray version and one image everywhere."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from prefect import Flow
from prefect.flows import load_flow_from_entrypoint

from flows.settings import MigrationSettings, settings_reference

ROOT = Path(__file__).parent.parent
INFRA = ROOT / "infra"
YAMLS = ["prefect.yaml", "ray-cluster.yaml", "kuberay-raycluster.yaml"]


def load(name: str) -> Any:
    return yaml.safe_load((INFRA / name).read_text())


def image_of(name: str) -> set[str]:
    return set(re.findall(r"registry\.example\.org/radiarc:[\w.-]+", (INFRA / name).read_text()))


@pytest.mark.parametrize("name", YAMLS)
def test_every_config_parses(name: str) -> None:
    assert isinstance(load(name), dict)


def test_prefect_deployments_point_at_the_flow_and_its_settings() -> None:
    config = load("prefect.yaml")
    deployments = config["deployments"]
    assert {d["name"] for d in deployments} == {"nightly-migration", "backfill"}
    for deployment in deployments:
        path, function = deployment["entrypoint"].split(":")
        flow = load_flow_from_entrypoint(f"{ROOT / path}:{function}")  # as `prefect deploy` does
        assert isinstance(flow, Flow) and flow.name == "radiarc-migrate"
        parameters = deployment["parameters"]
        assert set(parameters) <= set(inspect.signature(flow.fn).parameters)
        MigrationSettings.load(None, parameters["settings"])  # extra="forbid": real fields only
        assert deployment["work_pool"]["name"] == "radiarc-k8s"
        assert deployment["concurrency_limit"] == 1
    (scheduled,) = [d for d in deployments if d.get("schedules")]
    assert scheduled["schedules"][0]["cron"].count(" ") == 4


def test_environment_variables_in_infra_are_real_settings() -> None:
    known = {name for name, *_ in settings_reference()}
    for name in [*YAMLS, "Dockerfile"]:
        for variable in re.findall(r"\bRADIARC_[A-Z_]+", (INFRA / name).read_text()):
            assert variable in known, f"{name} sets unknown {variable}"
    deployment = load("prefect.yaml")["deployments"][0]
    env = deployment["work_pool"]["job_variables"]["env"]
    overrides = {k: v for k, v in env.items() if k.startswith("RADIARC_")}
    assert overrides and all(k in known for k in overrides)


def test_ray_cluster_configs_have_gpu_workers_and_one_ray_version() -> None:
    cluster = load("ray-cluster.yaml")
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith("g")
    assert any("ray start --head" in command for command in cluster["head_start_ray_commands"])

    kuberay = load("kuberay-raycluster.yaml")
    assert (kuberay["apiVersion"], kuberay["kind"]) == ("ray.io/v1", "RayCluster")
    assert kuberay["spec"]["rayVersion"] == ray.__version__
    (group,) = kuberay["spec"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-" in dockerfile

    images = [image_of(name) for name in YAMLS]
    assert all(len(found) == 1 for found in images) and len(set.union(*images)) == 1


def test_dockerfile_installs_the_project_and_the_pinned_torch() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text()
    pin = re.search(r'"torch>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    version = re.search(r"TORCH_VERSION=([\d.]+)", dockerfile)
    assert pin and version and version.group(1).startswith(pin.group(1))
    for folder in ("codec", "storage", "flows"):
        assert f"COPY --chown=ray:users {folder} ./{folder}" in dockerfile
    workdir = re.search(r"WORKDIR (\S+)", dockerfile)
    pull = load("prefect.yaml")["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert workdir and pull["directory"] == workdir.group(1)


def test_runbook_covers_the_operations() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    for topic in ("prefect deploy", "ray up", "kubectl", "radiarc migrate", "resume", "audit"):
        assert topic in runbook
