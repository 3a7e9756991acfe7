"""Check a request the client sends against Fly's Machines API description (tests/data swagger file).

The method and path must be a Fly operation; every query parameter must be one the operation declares, with
the declared type (boolean ``true``/``false``, integer digits, enum member); a JSON body must match the
operation's body schema *strictly* (no property the spec does not define, so a misspelt field fails). Two
documented Fly behaviours outside the swagger file are allowed: ``metadata.KEY=VALUE`` filters on the machine
list (Fly's docs: "filter machines by metadata") and ``{"value": "..."}`` as the body of a metadata set (what
flyctl's client sends).
"""

from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from typing import Any

import httpx
import jsonschema

from tests.host.specvalidate import spec, template_for

METADATA_FILTER_OP = ("GET", "/apps/{app_name}/machines")
METADATA_SET_OP = ("POST", "/apps/{app_name}/machines/{machine_id}/metadata/{key}")


def _strict(schema: Any) -> Any:
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(x) for x in schema]
    return schema


@lru_cache(maxsize=1)
def _strict_definitions() -> dict[str, Any]:
    return _strict(copy.deepcopy(spec()["definitions"]))  # type: ignore[no-any-return]


def operation_of(request: httpx.Request) -> tuple[str, str]:
    return request.method, template_for(request.url.path)


def check_request(request: httpx.Request) -> None:
    """Raise AssertionError when ``request`` is not a well-formed call of a Fly Machines API operation."""
    method, template = operation_of(request)
    operation = spec()["paths"][template].get(method.lower())
    assert operation is not None, f"{method} {template} is not an operation of Fly's Machines API"
    params = {p["name"]: p for p in operation.get("parameters", [])}
    for name, value in request.url.params.multi_items():
        if name.startswith("metadata.") and (method, template) == METADATA_FILTER_OP:
            assert len(name) > len("metadata."), "metadata filter without a key"
            continue
        declared = params.get(name)
        assert declared is not None and declared.get("in") == "query", \
            f"{method} {template}: query parameter {name!r} is not in Fly's spec (it has " \
            f"{sorted(n for n, p in params.items() if p.get('in') == 'query')})"
        if declared.get("type") == "boolean":
            assert value in ("true", "false"), f"{name}={value!r} is not a boolean"
        if declared.get("type") == "integer":
            assert re.fullmatch(r"-?\d+", value), f"{name}={value!r} is not an integer"
        if "enum" in declared:
            assert value in declared["enum"], f"{name}={value!r} is not one of {declared['enum']}"
    body_param = next((p for p in params.values() if p.get("in") == "body"), None)
    raw = request.content
    if (method, template) == METADATA_SET_OP:
        data = json.loads(raw)
        assert isinstance(data, dict) and set(data) == {"value"} and isinstance(data["value"], str), data
        return
    if body_param is None:
        assert not raw, f"{method} {template} takes no body in Fly's spec, got {raw[:200]!r}"
        return
    if not raw:
        assert not body_param.get("required"), f"{method} {template} needs a body"
        return
    assert request.headers.get("content-type", "").startswith("application/json"), request.headers
    root = {**_strict(body_param["schema"]), "definitions": _strict_definitions()}
    errors = list(jsonschema.Draft4Validator(root).iter_errors(json.loads(raw)))
    assert not errors, f"{method} {template} body breaks Fly's spec: " + "; ".join(
        f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors[:5])
