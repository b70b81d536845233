"""/openapi.json, made from the route table (routes.ROUTES) and the request Structs (schemas.py): what is
documented is what is served."""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import msgspec

from cardq.web.problems import TITLES

OPENAPI_VERSION = "3.1.0"


def document(routes: list[Any]) -> dict[str, Any]:
    return _document(tuple(routes))


@cache  # the table does not change while the process runs
def _document(routes: tuple[Any, ...]) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("cardq")
    except PackageNotFoundError:
        ver = "0"
    bodies = sorted({r.body for r in routes if r.body is not None}, key=lambda t: t.__name__)
    _, components = msgspec.json.schema_components(bodies, ref_template="#/components/schemas/{name}")
    components["Problem"] = {
        "type": "object", "description": "RFC 9457 problem details",
        "required": ["type", "title", "status", "detail", "request_id"],
        "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                       "detail": {"type": "string"}, "instance": {"type": "string"},
                       "request_id": {"type": "string"}},
        "additionalProperties": True}
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {"summary": r.summary, "operationId": r.handler.__name__,
                              "responses": {str(r.ok): {"description": "success"}}}
        params = [{"name": n, "in": "path", "required": True,
                   "schema": {"type": "integer", "minimum": 1} if n == "id" else {"type": "string", "minLength": 1}}
                  for n in re.findall(r"{(\w+)}", r.path)]
        params += [{"name": p.name, "in": "query", "required": p.required, "description": p.doc,
                    "schema": {"type": p.kind, **({"minimum": p.lo} if p.lo is not None else {}),
                               **({"maximum": p.hi} if p.hi is not None else {})}} for p in r.params]
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{r.body.__name__}"}}}}
        errors = set(r.errors) | {400} if r.body is not None else set(r.errors)
        if r.scope is not None:
            op["security"] = [{"bearer": [r.scope]}]
            op["description"] = f"Needs a token of scope {r.scope!r} or above (read < app < admin)."
            errors |= {401, 403}
        for status in sorted(errors):
            op["responses"][str(status)] = {"description": TITLES.get(status, "error"), "content": {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "cardq", "version": ver,
                 "description": "cardq's HTTP API: jobs, limits, rate limits, gates, counters, traffic events, "
                                "path statistics and diagnostics."},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
