"""The shipped alert rules and dashboard: valid for Prometheus, unit-tested rule by rule with
promtool, and written against series livecount really exposes."""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

from livecount.service import Service, Settings
from livecount.supervisor import render_families, supervisor_families
from livecount.worker import health_app
from tests.server.stream_support import StreamClient, stream_server, stream_settings
from tests.server.support import create_tenant
from tests.state.redis_support import delete_prefix, prefix_of, scratch_url

from .support import DEPLOY, promtool

pytestmark = pytest.mark.anyio

RULES = DEPLOY / "alerts.yml"
RULE_TESTS = DEPLOY / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
_METRIC = re.compile(r"\blivecount_[a-z0-9_]+")


def alert_names() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"]]


def test_promtool_check_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    """Every unit test in alerts.test.yml passes (exact labels and rendered annotations)."""
    result = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=DEPLOY,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_rule_has_a_unit_test_that_fires_it() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired: Counter[str] = Counter()
    quiet: Counter[str] = Counter()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else quiet)[case["alertname"]] += 1
    names = alert_names()
    assert len(names) == len(set(names)), "duplicate alert names"
    assert set(fired) == set(names), f"rules without a firing test: {set(names) - set(fired)}"
    assert set(quiet) <= set(names)
    # the incident's pattern: fires on threads + RSS climbing with flat requests, and not when
    # the same growth comes with growing traffic or in a healthy steady state
    assert fired["LivecountLeakPattern"] >= 1 and quiet["LivecountLeakPattern"] >= 3
    incident = next(t for t in tests if t["name"].startswith("leak pattern"))
    hours = max(int(case["eval_time"].rstrip("h")) for case in incident["alert_rule_test"]
                if case["eval_time"].endswith("h"))
    assert hours >= 4, "the leak pattern test spans hours"


def test_promtool_catches_a_wrong_expectation(tmp_path: Path) -> None:
    """The rule tests mean something: a changed expectation makes promtool fail."""
    (tmp_path / "alerts.yml").write_text(RULES.read_text())
    suite = yaml.safe_load(RULE_TESTS.read_text())
    suite["tests"] = [t for t in suite["tests"] if t["name"].startswith("tasks growing while")]
    assert len(suite["tests"]) == 1
    text = yaml.safe_dump(suite).replace("is 240 above", "is 241 above")
    (tmp_path / "alerts.test.yml").write_text(text)
    result = subprocess.run([promtool(), "test", "rules", "alerts.test.yml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "LivecountTasksGrowing" in result.stdout + result.stderr


def _names_used() -> dict[str, set[str]]:
    rules = {m for expr in _exprs_of_rules() for m in _METRIC.findall(expr)}
    dashboard = json.loads(DASHBOARD.read_text())
    panels = {m for panel in dashboard["panels"] for target in panel["targets"]
              for m in _METRIC.findall(target["expr"])}
    return {"rules": rules, "dashboard": panels}


def _exprs_of_rules() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


async def test_rules_and_dashboard_use_series_livecount_exposes(tmp_path: Path) -> None:
    """Every series name in the rules and the dashboard appears in a real /metrics scrape
    (a server with a stream that received a delta, so histograms have samples) or in the
    supervisor's series."""
    async with stream_server(stream_settings(tmp_path)) as server, server.client() as http:
        tenant = await create_tenant(http, server.admin_token)
        person = tenant.people[0]
        async with StreamClient(server, "ws", tenant.id, person.token) as client:
            await client.wait_for(lambda m: m.seq >= 0)
            response = await http.post(tenant.url("/conversations"), json={},
                                       headers=person.headers)
            assert response.status_code == 201
            await client.wait_for(lambda m: bool(m.of("delta")))
            text = (await http.get("/metrics")).text
    supervisor = render_families(supervisor_families(workers=2, ready=2, restarts=0,
                                                     recycles=Counter(), failures=0)).decode()
    exposed = set(_METRIC.findall(text)) | set(_METRIC.findall(supervisor))
    for where, names in _names_used().items():
        unknown = names - exposed - WORKER_ONLY
        assert not unknown, f"the {where} use series livecount does not expose: {unknown}"


#: Series only a process that counts under leases exposes (a shared Redis counter state).
WORKER_ONLY = {"livecount_shards", "livecount_shards_owned", "livecount_leases_lost_total"}


@pytest.mark.redis
async def test_worker_only_series_are_exposed_by_a_real_counter_worker(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The series the lease rules use, scraped from a counter worker's /metrics (a real
    Service in the worker role on Redis, serving its health app)."""
    url = scratch_url(request.config)
    service = Service(Settings(store_url=f"sqlite:///{tmp_path}/w.db", broker_url=url,
                               role="worker", reconcile_every=None, lease_ttl=5, shards=8))
    await service.start()
    try:
        transport = httpx.ASGITransport(app=health_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://w") as http:
            assert (await http.get("/healthz")).status_code == 200
            text = (await http.get("/metrics")).text
    finally:
        await service.stop()
        delete_prefix(prefix_of(url))
    exposed = set(_METRIC.findall(text))
    assert exposed >= WORKER_ONLY, WORKER_ONLY - exposed
    assert "livecount_shards_owned 8.0" in text  # the only worker holds every shard
    used = set().union(*_names_used().values())
    assert used >= WORKER_ONLY  # each is used by a rule (else drop it from the list)


def test_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    for panel in dashboard["panels"]:
        assert panel["type"] == "timeseries" and panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
    used = _names_used()["dashboard"]
    for series in ("livecount_process_resident_memory_bytes", "livecount_process_threads",
                   "livecount_asyncio_tasks", "livecount_process_open_fds",
                   "livecount_outbox_lag_seconds", "livecount_stream_delivery_seconds_bucket",
                   "livecount_worker_recycles_total", "livecount_worker_restarts_total",
                   "livecount_ready", "livecount_memory_hard_watermark_bytes"):
        assert series in used, series


def test_ci_installs_promtool() -> None:
    script = (DEPLOY.parent / ".ci" / "run").read_text()
    assert "apt-get install -y -q prometheus" in script
    assert "command -v promtool" in script


