"""Generate a deterministic value that satisfies a tool's JSON `input_schema` (what a forced tool_use returns)."""
from __future__ import annotations

import re
from typing import Any

try:  # Python 3.11+: the regex parser lives in re._parser
    import re._parser as sre_parse  # type: ignore[import-not-found]
    import re._constants as sre_c  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - older interpreters
    import sre_constants as sre_c
    import sre_parse

MAX_DEPTH = 8
_FORMATS = {
    "date-time": "2025-01-15T09:30:00Z",
    "date": "2025-01-15",
    "time": "09:30:00Z",
    "email": "ops@example.com",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "123e4567-e89b-12d3-a456-426614174000",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
}


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    seen = 0
    while isinstance(schema, dict) and "$ref" in schema and seen < 20:
        ref = str(schema["$ref"])
        if not ref.startswith("#"):
            return {}
        node: Any = root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part, {}) if isinstance(node, dict) else {}
        schema = node if isinstance(node, dict) else {}
        seen += 1
    return schema


def _from_regex(pattern: str) -> str | None:
    """The shortest string the regex parser can build for simple patterns (classes, literals, repeats)."""
    try:
        parsed = sre_parse.parse(pattern)
    except Exception:
        return None

    def build(items: Any) -> str:
        out = []
        for op, arg in items:
            if op == sre_c.LITERAL:
                out.append(chr(arg))
            elif op == sre_c.ANY:
                out.append("a")
            elif op == sre_c.IN:
                out.append(_pick_in(arg))
            elif op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT):
                lo, _hi, sub = arg
                out.append(build(sub) * lo)
            elif op == sre_c.SUBPATTERN:
                out.append(build(arg[-1]))
            elif op == sre_c.BRANCH:
                out.append(build(arg[1][0]))
            elif op == sre_c.CATEGORY:
                out.append(_category(arg))
            elif op in (sre_c.AT, sre_c.ASSERT, sre_c.ASSERT_NOT):
                continue
            else:
                raise ValueError(op)
        return "".join(out)

    try:
        return build(parsed)
    except Exception:
        return None


def _category(cat: Any) -> str:
    name = str(cat)
    if "DIGIT" in name and "NOT" not in name:
        return "0"
    if "SPACE" in name and "NOT" not in name:
        return " "
    return "a"


def _pick_in(items: Any) -> str:
    negate = any(op == sre_c.NEGATE for op, _ in items)
    if negate:
        banned = set()
        for op, arg in items:
            if op == sre_c.LITERAL:
                banned.add(chr(arg))
            elif op == sre_c.RANGE:
                banned.update(chr(c) for c in range(arg[0], arg[1] + 1))
        return next(c for c in "aA0_x" if c not in banned)
    for op, arg in items:
        if op == sre_c.LITERAL:
            return chr(arg)
        if op == sre_c.RANGE:
            return chr(arg[0])
        if op == sre_c.CATEGORY:
            return _category(arg)
    return "a"


def _string(schema: dict[str, Any], name: str) -> str:
    fmt = schema.get("format")
    value = _FORMATS.get(str(fmt), None) if fmt else None
    pattern = schema.get("pattern")
    if value is None and isinstance(pattern, str):
        candidate = _from_regex(pattern)
        if candidate is not None and re.search(pattern, candidate):
            value = candidate
    if value is None:
        value = f"example {name}".strip() if name else "example"
    lo = int(schema.get("minLength", 0))
    hi = schema.get("maxLength")
    if len(value) < lo:
        value = value + "x" * (lo - len(value))
    if hi is not None and len(value) > int(hi):
        value = value[: int(hi)]
    return value


def _number(schema: dict[str, Any], integer: bool) -> int | float:
    lo = schema.get("minimum")
    hi = schema.get("maximum")
    xlo = schema.get("exclusiveMinimum")
    xhi = schema.get("exclusiveMaximum")
    step = 1 if integer else 0.01
    if isinstance(xlo, (int, float)) and not isinstance(xlo, bool):
        lo = xlo + step if lo is None else max(lo, xlo + step)
    if isinstance(xhi, (int, float)) and not isinstance(xhi, bool):
        hi = xhi - step if hi is None else min(hi, xhi - step)
    if lo is not None and hi is not None:
        value: float = (lo + hi) / 2
    elif lo is not None:
        value = lo
    elif hi is not None:
        value = min(hi, 0)
    else:
        value = 1
    mult = schema.get("multipleOf")
    if isinstance(mult, (int, float)) and mult > 0:
        value = round(value / mult) * mult
        if lo is not None and value < lo:
            value += mult
        if hi is not None and value > hi:
            value -= mult
    if integer:
        iv = int(value)
        if lo is not None and iv < lo:
            iv += 1
        return iv
    return round(float(value), 6)


def generate(schema: Any, root: dict[str, Any] | None = None, name: str = "", depth: int = 0) -> Any:
    """A deterministic instance of `schema` (required properties, types, enums, bounds, formats, $ref)."""
    if schema is True or schema is None:
        return "example"
    if not isinstance(schema, dict):
        return None
    root = root if root is not None else schema
    schema = _resolve(schema, root)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    if "default" in schema and depth > 0:
        return schema["default"]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            non_null = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            return generate((non_null or options)[0], root, name, depth + 1)
    if isinstance(schema.get("allOf"), list):
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            part = _resolve(part, root) if isinstance(part, dict) else {}
            for k, v in part.items():
                if k == "properties":
                    merged.setdefault("properties", {}).update(v)
                elif k == "required":
                    merged.setdefault("required", []).extend(v)
                else:
                    merged[k] = v
        rest = {k: v for k, v in schema.items() if k != "allOf"}
        merged.update({k: v for k, v in rest.items() if k not in ("properties", "required")})
        merged.setdefault("properties", {}).update(rest.get("properties", {}))
        merged.setdefault("required", []).extend(rest.get("required", []))
        return generate(merged, root, name, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        props = schema.get("properties") or {}
        required = [r for r in schema.get("required") or [] if isinstance(r, str)]
        keys = list(props) if depth < MAX_DEPTH else [k for k in props if k in required]
        out = {k: generate(props[k], root, k, depth + 1) for k in keys}
        for k in required:
            out.setdefault(k, "example")
        min_props = int(schema.get("minProperties", 0))
        extra = 0
        while len(out) < min_props:
            out[f"extra_{extra}"] = "example"
            extra += 1
        return out
    if kind == "array":
        items = schema.get("items", {})
        lo = int(schema.get("minItems", 1))
        hi = schema.get("maxItems")
        n = lo if hi is None else min(lo, int(hi))
        if isinstance(items, list):  # tuple form
            return [generate(s, root, name, depth + 1) for s in items][: max(n, len(items))]
        values = []
        enum = _resolve(items, root).get("enum") if isinstance(items, dict) else None
        for i in range(n):
            if schema.get("uniqueItems") and isinstance(enum, list) and i < len(enum):
                values.append(enum[i])
                continue
            v = generate(items, root, name, depth + 1)
            if schema.get("uniqueItems") and isinstance(v, str) and i:
                v = f"{v} {i}"
            elif schema.get("uniqueItems") and isinstance(v, (int, float)) and not isinstance(v, bool) and i:
                v = v + i
            values.append(v)
        return values
    if kind == "string":
        return _string(schema, name)
    if kind == "integer":
        return _number(schema, True)
    if kind == "number":
        return _number(schema, False)
    if kind == "boolean":
        return True
    return None
