"""Endpoint wiring: parse with marshmallow, call the service, dump the result; OpenAPI from the same schemas."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Flask, Response, g, jsonify, request
from marshmallow import Schema

from .errors import BadRequest, Forbidden


@dataclass
class Endpoint:
    rule: str
    methods: tuple[str, ...]
    summary: str
    body: type[Schema] | None
    query: type[Schema] | None
    response: type[Schema] | None
    status: int
    callers: tuple[str, ...] | None
    many: bool = False
    tags: tuple[str, ...] = field(default_factory=tuple)


class Api:
    """A Blueprint plus the endpoint descriptions OpenAPI is generated from."""

    def __init__(self, name: str, import_name: str, url_prefix: str = "") -> None:
        self.blueprint = Blueprint(name, import_name, url_prefix=url_prefix)
        self.url_prefix = url_prefix
        self.endpoints: list[Endpoint] = []

    def route(self, rule: str, *, methods: Iterable[str] = ("GET",), body: type[Schema] | None = None,
              query: type[Schema] | None = None, response: type[Schema] | None = None, status: int = 200,
              callers: Iterable[str] | None = None, many: bool = False,
              summary: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a view. The view gets `body=` / `query=` kwargs already validated and returns data to dump
        (or a (data, status) tuple, or a Response)."""
        methods_t = tuple(m.upper() for m in methods)

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            ep = Endpoint(self.url_prefix + rule, methods_t, summary or (fn.__doc__ or "").strip().split("\n")[0],
                          body, query, response, status, tuple(callers) if callers else None, many,
                          (self.blueprint.name,))
            self.endpoints.append(ep)

            @functools.wraps(fn)
            def view(**kwargs: Any) -> Any:
                if ep.callers is not None and g.get("caller") not in ep.callers:
                    raise Forbidden(f"caller {g.get('caller')!r} may not call this endpoint; "
                                    f"allowed: {', '.join(ep.callers)}")
                if body is not None:
                    payload = request.get_json(silent=True)
                    if not isinstance(payload, dict):
                        raise BadRequest("the request body must be a JSON object (Content-Type: application/json)",
                                         code="invalid_json")
                    kwargs["body"] = body().load(payload)
                if query is not None:
                    kwargs["query"] = query().load(request.args.to_dict())
                result = fn(**kwargs)
                if isinstance(result, Response):
                    return result
                code = status
                if isinstance(result, tuple):
                    result, code = result
                if response is not None:
                    result = response(many=many).dump(result)
                return jsonify(result), code

            self.blueprint.add_url_rule(rule, view_func=view, methods=list(methods_t))
            return view

        return deco


def _path_params(rule: str) -> tuple[str, list[dict[str, Any]]]:
    import re

    params = []
    for conv, name in re.findall(r"<(?:(\w+):)?(\w+)>", rule):
        params.append({"name": name, "in": "path", "required": True,
                       "schema": {"type": "integer" if conv == "int" else "string"}})
    return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule), params


def build_openapi(title: str, version: str, apis: Iterable[Api]) -> dict[str, Any]:
    """OpenAPI 3.1 generated from the registered endpoints and their marshmallow schemas."""
    spec = APISpec(title=title, version=version, openapi_version="3.1.0", plugins=[MarshmallowPlugin()])
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    problem = {"description": "Error (application/problem+json)",
               "content": {"application/problem+json": {"schema": {"type": "object", "properties": {
                   "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                   "code": {"type": "string"}, "detail": {"type": "string"}}}}}}
    paths: dict[str, dict[str, Any]] = {}
    for api in apis:
        for ep in api.endpoints:
            path, params = _path_params(ep.rule)
            for method in ep.methods:
                op: dict[str, Any] = {"summary": ep.summary, "tags": list(ep.tags),
                                      "security": [{"bearer": []}], "parameters": list(params),
                                      "responses": {"400": problem, "401": problem}}
                if ep.body is not None:
                    op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ep.body}}}
                if ep.query is not None:
                    op["parameters"].append({"in": "query", "schema": ep.query})
                if ep.response is not None:
                    schema: Any = ep.response
                    if ep.many:
                        schema = {"type": "array", "items": ep.response}
                    op["responses"][str(ep.status)] = {"description": "OK",
                                                       "content": {"application/json": {"schema": schema}}}
                else:
                    op["responses"][str(ep.status)] = {"description": "OK"}
                paths.setdefault(path, {})[method.lower()] = op
    for path, ops in paths.items():
        spec.path(path=path, operations=ops)
    return spec.to_dict()


def register_apis(app: Flask, apis: Iterable[Api]) -> list[Api]:
    apis = list(apis)
    for api in apis:
        app.register_blueprint(api.blueprint)
    return apis
