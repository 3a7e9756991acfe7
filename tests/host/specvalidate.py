"""Validate the local host's answers against Fly's Machines API description (Swagger 2.0).

openapi-core does not read Swagger 2.0, so this resolves each path/method/status response schema from
``tests/data/fly-machines-api.swagger.json`` and checks the body with jsonschema (draft 4, which Swagger 2.0
schemas are), ``$ref`` resolved inside the same document.

Two documented relaxations, both faithful to the real API: a property may be ``null`` (Fly's Go server sends
``null`` for unset pointers such as ``attached_machine_id``; Swagger 2.0 cannot say "nullable"), and an error
status the spec does not list (404, 408, 412, 422, 429, 5xx...) must carry Fly's ``ErrorResponse`` body.
"""

from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema

SPEC_PATH = Path(__file__).resolve().parents[1] / "data" / "fly-machines-api.swagger.json"

VALIDATED: set[tuple[str, str, str]] = set()
"""Every answer validated in this test session: (METHOD, spec path template, "ok" or "error").
``test_zz_spec_coverage`` checks that each operation the host serves was validated both ways."""


_APP = {"type": "string", "name": "app_name", "in": "path", "required": True}
BEYOND_SWAGGER: dict[str, Any] = {
    # Operations Fly serves that the swagger file in tests/data does not describe: the app-level IP assignments
    # that fly-go's flaps client calls (flaps/flaps_ip_assignments.go: ListIPAssignmentsResponse, IPAssignment,
    # AssignIPRequest). Their shapes are modelled here from those structs and marked x-source.
    "paths": {
        "/apps/{app_name}/ip_assignments": {
            "get": {"operationId": "IPAssignments_list", "x-source": "fly-go flaps GetIPAssignments",
                    "parameters": [_APP], "responses": {"200": {"schema": {
                        "$ref": "#/definitions/ListIPAssignmentsResponse"}}}},
            "post": {"operationId": "IPAssignments_create", "x-source": "fly-go flaps AssignIP",
                     "parameters": [_APP, {"name": "request", "in": "body", "required": True,
                                           "schema": {"$ref": "#/definitions/AssignIPRequest"}}],
                     "responses": {"200": {"schema": {"$ref": "#/definitions/IPAssignment"}}}}},
        "/apps/{app_name}/ip_assignments/{ip}": {
            "delete": {"operationId": "IPAssignments_delete", "x-source": "fly-go flaps DeleteIPAssignment",
                       "parameters": [_APP, {"type": "string", "name": "ip", "in": "path", "required": True}],
                       "responses": {"200": {"description": "OK"}}}}},
    "definitions": {
        "ListIPAssignmentsResponse": {"type": "object", "properties": {
            "ips": {"type": "array", "items": {"$ref": "#/definitions/IPAssignment"}}}},
        "IPAssignment": {"type": "object", "required": ["ip"], "properties": {
            "ip": {"type": "string"}, "region": {"type": "string"}, "service_name": {"type": "string"},
            "shared": {"type": "boolean"}, "created_at": {"type": "string"}, "type": {"type": "string"}}},
        "AssignIPRequest": {"type": "object", "properties": {
            "type": {"type": "string"}, "region": {"type": "string"}, "org_slug": {"type": "string"},
            "network": {"type": "string"}, "service_name": {"type": "string"}}}},
}


@lru_cache(maxsize=1)
def spec() -> dict[str, Any]:
    """Fly's swagger file plus :data:`BEYOND_SWAGGER` (operations Fly's own client calls that it lacks)."""
    doc = json.loads(SPEC_PATH.read_text())
    doc["paths"].update(BEYOND_SWAGGER["paths"])
    doc["definitions"].update(BEYOND_SWAGGER["definitions"])
    return doc  # type: ignore[no-any-return]


def _nullable(schema: Any) -> Any:
    if isinstance(schema, dict):
        out = {k: _nullable(v) for k, v in schema.items()}
        props = out.get("properties")
        if isinstance(props, dict):
            for name, prop in props.items():
                if isinstance(prop, dict) and isinstance(prop.get("type"), str):
                    props[name] = {**prop, "type": [prop["type"], "null"]}
                    if "enum" in prop:
                        props[name]["enum"] = [*prop["enum"], None]
                elif isinstance(prop, dict) and ("$ref" in prop or "allOf" in prop):
                    props[name] = {"anyOf": [prop, {"type": "null"}]}
        return out
    if isinstance(schema, list):
        return [_nullable(x) for x in schema]
    return schema


@lru_cache(maxsize=1)
def _definitions() -> dict[str, Any]:
    return _nullable(copy.deepcopy(spec()["definitions"]))  # type: ignore[no-any-return]


def _template_for(path: str) -> str:
    """Map a concrete path (``/v1/apps/x/machines/y``) to the spec's template (``/apps/{app_name}/...``)."""
    base = spec()["basePath"]
    rel = path.split("?", 1)[0]
    if rel.startswith(base):
        rel = rel[len(base):]
    for template in spec()["paths"]:
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, rel):
            return str(template)
    raise AssertionError(f"{path} is not a path of Fly's Machines API")


def template_for(path: str) -> str:
    return _template_for(path)


def response_schema(path: str, method: str, status: int) -> dict[str, Any] | None:
    template = _template_for(path)
    operation = spec()["paths"][template].get(method.lower())
    assert operation is not None, f"{method} {template} is not an operation of Fly's Machines API"
    responses = operation.get("responses", {})
    if str(status) in responses:
        return responses[str(status)].get("schema")  # type: ignore[no-any-return]
    if status >= 400:
        return {"$ref": "#/definitions/ErrorResponse"}
    raise AssertionError(f"{method} {template} answered {status}, which the spec does not list "
                         f"(it lists {sorted(responses)})")


def validate(path: str, method: str, status: int, body: Any) -> None:
    """Raise AssertionError when ``body`` does not match the spec's schema for this answer."""
    schema = response_schema(path, method, status)
    if schema is None:  # the spec documents this status without a body schema (e.g. 204, wait's 200)
        VALIDATED.add((method.upper(), _template_for(path), "ok"))
        return
    root = {**_nullable(schema), "definitions": _definitions()}
    validator = jsonschema.Draft4Validator(root)
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.path))
    if errors:
        detail = "; ".join(f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors[:5])
        raise AssertionError(f"{method} {path} -> {status} does not match Fly's spec: {detail}")
    if status >= 400:
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    VALIDATED.add((method.upper(), _template_for(path), "error" if status >= 400 else "ok"))


def _shape(template: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", template)


def served_operations() -> set[tuple[str, str]]:
    """(METHOD, spec template) for every /v1 route of the host, mapped onto Fly's spec."""
    from typing import cast

    from sandkeep.host.api import HostAPI
    from sandkeep.host.core import Host

    api = HostAPI(cast(Host, object()), "token")  # routes() only builds handlers; no host is touched
    by_shape = {_shape(t): t for t in spec()["paths"]}
    out: set[tuple[str, str]] = set()
    for route in api.routes():
        if not route.path.startswith("/v1/"):
            continue
        template = by_shape.get(_shape(route.path[len("/v1"):]))
        assert template is not None, f"{route.path} is not a path of Fly's Machines API"
        for method in route.methods or ():
            if method == "HEAD":
                continue
            assert method.lower() in spec()["paths"][template], f"{method} {template} is not a Fly operation"
            out.add((method, template))
    return out


def missing_operations(validated: set[tuple[str, str, str]]) -> list[str]:
    """Served operations without a validated success or error answer, as "METHOD template (kind)"."""
    return sorted(f"{method} {template} ({kind})" for method, template in served_operations()
                  for kind in ("ok", "error") if (method, template, kind) not in validated)
