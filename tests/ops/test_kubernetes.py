"""deploy/kubernetes: valid against the Kubernetes API schemas (offline, kubernetes-validate),
and consistent with livecount: probes on /readyz and /healthz, a preStop that drains, a grace
period longer than the drain, memory that matches the watermarks, an HPA on memory and on
connections per pod, a PodDisruptionBudget; and deploy/prometheus.yml loads the rules."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from livecount.cli import build_parser
from livecount.memory import MemoryLimit, resolve_watermarks

from .support import DEPLOY, missing, promtool

KUBERNETES = DEPLOY / "kubernetes"
VERSIONS = ("1.29.0", "1.33.0")


def documents() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        found += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def deployment(component: str) -> dict[str, Any]:
    (found,) = [doc for doc in by_kind("Deployment")
                if doc["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return found


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_offline(version: str) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate", "pip install -e '.[dev]'")
    docs = documents()
    assert {doc["kind"] for _, doc in docs} >= {"Deployment", "Service",
                                                "HorizontalPodAutoscaler",
                                                "PodDisruptionBudget"}
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: "
                        f"{error.message} at {'.'.join(map(str, error.path))}")


def test_validation_catches_a_broken_manifest() -> None:
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate", "pip install -e '.[dev]'")
    gateway = deployment("gateway")
    gateway["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"][
        "port"] = {"not": "a port"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, VERSIONS[-1], strict=True)


def _flag(args: list[str], name: str) -> str:
    for arg in args:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"--{name} not in {args}")


def test_the_gateway_deployment_fits_livecount() -> None:
    spec = deployment("gateway")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = container["args"]
    assert args[0] == "serve"
    workers = int(_flag(args, "workers"))
    assert workers >= 2 and not _flag(args, "broker").startswith("memory:")
    # the gateways only serve: the worker Deployment counts
    assert _flag(args, "counter-workers") == "0"
    build_parser().parse_args(args)  # every flag exists
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # preStop: wait, SIGTERM the supervisor (PID 1: it drains every worker), wait for it
    pre_stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    wait = int(re.search(r"sleep (\d+)", pre_stop).group(1))  # type: ignore[union-attr]
    assert "kill -TERM 1" in pre_stop and "kill -0 1" in pre_stop
    drain = float(_flag(args, "drain-timeout"))
    http_grace = 10  # WorkerSpec.graceful_timeout
    assert spec["terminationGracePeriodSeconds"] > wait + drain + http_grace
    # memory: requests == limits; the default watermarks of a worker's share sit below it
    resources = container["resources"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    limit = _bytes(resources["limits"]["memory"])
    marks = resolve_watermarks(workers=workers, limit=MemoryLimit(limit, "pod"))
    assert marks.soft < marks.hard < limit // workers
    # the HPA's memory target is below every worker's soft watermark
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    memory = next(m for m in hpa["spec"]["metrics"] if m["type"] == "Resource")
    assert memory["resource"]["name"] == "memory"
    assert memory["resource"]["target"]["averageUtilization"] / 100 * limit / workers < marks.soft


def test_the_worker_deployment_fits_livecount() -> None:
    spec = deployment("worker")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = container["args"]
    assert args[0] == "worker"
    assert _flag(args, "broker") == "$(LIVECOUNT_BROKER)"
    parsed = build_parser().parse_args(args)
    (port,) = container["ports"]
    assert port["containerPort"] == parsed.port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    # SIGTERM gives the leases back: the grace period must let it
    assert spec["terminationGracePeriodSeconds"] >= 15


def test_hpa_pdb_and_service_select_the_gateways() -> None:
    gateway = deployment("gateway")
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert gateway["spec"]["selector"]["matchLabels"].items() <= labels.items()
    worker_labels = deployment("worker")["spec"]["template"]["metadata"]["labels"]
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == gateway["metadata"]["name"]
    pods = next(m for m in hpa["spec"]["metrics"] if m["type"] == "Pods")
    assert pods["pods"]["metric"]["name"] == "livecount_stream_connections"
    (pdb,) = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (service,) = by_kind("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    # the Service never sends clients to a counter worker (it serves no API)
    assert not service["spec"]["selector"].items() <= worker_labels.items()


def test_prometheus_config_loads_the_rules() -> None:
    result = subprocess.run([promtool(), "check", "config", "prometheus.yml"], cwd=DEPLOY,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)
