"""The OpenAPI document matches the server: the same operations as the route table, every
error it can answer documented, and a schemathesis run against the live server finds no 5xx,
no undocumented status and no response that breaks its schema."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Mount, Route, WebSocketRoute, compile_path

from .support import LiveServer, Tenant

pytestmark = pytest.mark.anyio

METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


def route_operations(routes: list[Any]) -> set[tuple[str, str]]:
    """(path template, method) of every route; a WebSocket route is a GET (the upgrade), a
    mount of static files a GET of ``{path}`` below it."""
    found: set[tuple[str, str]] = set()
    for route in routes:
        if isinstance(route, Mount):
            found.add((f"{route.path}/{{path}}", "get"))
            continue
        _, template, _ = compile_path(route.path)
        if isinstance(route, WebSocketRoute):
            found.add((template, "get"))
        elif isinstance(route, Route):
            found.update((template, m.lower()) for m in route.methods or () if m != "HEAD")
        else:
            raise AssertionError(f"undocumentable route {route!r}")
    return found


def document_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method) for path, item in document["paths"].items()
            for method in item if method in METHODS}


async def test_document_describes_exactly_the_routes(live_server: LiveServer,
                                                     client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert document["openapi"].startswith("3.1")
    assert document_operations(document) == route_operations(live_server.app.routes)
    assert ("/api/workspaces/{workspace_id}/ws", "get") in document_operations(document)


async def test_every_operation_documents_its_errors(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    responses = document["components"]["responses"]
    schemas = document["components"]["schemas"]

    def resolve(ref: str) -> Any:
        node: Any = document
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return node

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for value in node.values() for r in refs(value)]
        if isinstance(node, list):
            return [r for value in node for r in refs(value)]
        return []

    for ref in refs(document):
        resolve(ref)  # every reference resolves
    for status, response in responses.items():
        schema = response["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Error"}, status
    assert schemas["Error"]["required"] == ["error"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            statuses = set(operation["responses"])
            assert any(s.startswith("2") or s == "101" for s in statuses), (path, method)
            if path.startswith("/api/"):
                assert {"401", "403", "404"} <= statuses, (path, method)
                assert operation.get("security", document["security"]) == [{"bearer": []}]
            if "requestBody" in operation:
                assert {"400", "413"} <= statuses, (path, method)
            if method == "patch":
                assert "412" in statuses
        assert "servers" not in item


async def test_post_teammate_documents_the_conflict(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    operation = document["paths"]["/api/workspaces/{workspace_id}/teammates"]["post"]
    assert "409" in operation["responses"]


def _schemathesis() -> str | None:
    beside = Path(sys.executable).with_name("schemathesis")
    return str(beside) if beside.exists() else shutil.which("schemathesis")


CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,response_headers_conformance")


async def test_schemathesis_finds_nothing(live_server: LiveServer, client: httpx.AsyncClient,
                                          tenant: Tenant, tmp_path: Path) -> None:
    """Fuzz every operation (but the two streams, which never end) as a teammate and as the
    admin: no server error, every status and body as documented."""
    cli = _schemathesis()
    if cli is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    (tmp_path / "schemathesis.toml").write_text(f"[parameters]\nworkspace_id = {tenant.id}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEMATHESIS_")}
    # as a teammate: everything; as the admin: what only the admin can do
    runs = [(tenant.people[0].token, ["--exclude-path-regex", r"/(stream|ws)$"]),
            (live_server.admin_token, ["--include-path-regex",
                                       r"^/api/workspaces(/\{workspace_id\}/(teammates|teams))?$"])]
    for token, selection in runs:
        process = await asyncio.create_subprocess_exec(
            cli, "--config-file", str(tmp_path / "schemathesis.toml"), "run",
            f"{live_server.base_url}/openapi.json", "--checks", CHECKS,
            "-H", f"Authorization: Bearer {token}", "--max-examples", "10", "--seed", "1",
            "--phases", "examples,coverage,fuzzing", "--workers", "1", "--no-shrink",
            "--request-timeout", "10", "--max-failures", "5", *selection,
            cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        output, _ = await process.communicate()
        text = output.decode(errors="replace")
        assert process.returncode == 0, text[-6000:]
        passed = re.search(r"(\d+) generated, (\d+) passed", text)
        assert passed is not None and int(passed.group(2)) > 100, text[-3000:]
