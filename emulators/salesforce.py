"""Salesforce REST emulator: OAuth 2.0 client-credentials token and SOQL query with `nextRecordsUrl` paging.

`POST /services/oauth2/token` (form: grant_type=client_credentials, client_id, client_secret) →
`{access_token, instance_url, token_type: "Bearer", ...}`; `GET /services/data/vNN.N/query?q=SOQL` and
`GET /services/data/vNN.N/query/<locator>`; `GET /services/data/vNN.N/sobjects/<Object>/<Id>`.
Page size from `Sforce-Query-Options: batchSize=N` (200–2000, default 2000).

SOQL subset: `SELECT f, Rel.f, COUNT() FROM Object [WHERE …] [ORDER BY f [ASC|DESC] [NULLS FIRST|LAST], …]
[LIMIT n] [OFFSET n]`; conditions `= != <> < <= > >= LIKE IN NOT IN`, `AND`, `OR`, `NOT`, parentheses;
values: 'strings', numbers, true / false / null, dates (2024-01-31), datetimes (2024-01-31T00:00:00Z),
TODAY, YESTERDAY, LAST_N_DAYS:n, NEXT_N_DAYS:n. Errors are Salesforce's `[{"message", "errorCode"}]`.
"""
from __future__ import annotations

import hmac
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable

from flask import Flask, Response, jsonify, request

from emulators.common import FaultInjector, add_control_routes, add_control_error_handler, apply_fault, control_json

ID_PREFIX = {"Account": "001", "Contact": "003", "Case": "500", "Opportunity": "006"}
BASE_FIELDS = {
    "Account": ["Id", "Name", "Type", "Industry", "AnnualRevenue", "NumberOfEmployees", "OwnerId", "CreatedDate",
                "LastModifiedDate"],
    "Case": ["Id", "CaseNumber", "Subject", "Description", "Status", "Priority", "Origin", "AccountId", "IsClosed",
             "IsEscalated", "CreatedDate", "ClosedDate", "LastModifiedDate"],
    "Contact": ["Id", "FirstName", "LastName", "Email", "AccountId", "CreatedDate"],
    "Opportunity": ["Id", "Name", "StageName", "Amount", "CloseDate", "AccountId", "CreatedDate"],
}
RELATIONSHIPS = {"Account": ("AccountId", "Account")}  # Case.Account.Name etc.


class SoqlError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*')|(?P<op><=|>=|!=|<>|=|<|>)|(?P<punct>[(),])|(?P<word>[A-Za-z0-9_.:\-+]+))")


def _tokens(q: str) -> list[str]:
    out, pos = [], 0
    q = q.strip()
    while pos < len(q):
        m = _TOKEN.match(q, pos)
        if not m or m.end() == pos:
            raise SoqlError("MALFORMED_QUERY", f"unexpected token: '{q[pos:pos + 10]}'")
        out.append(m.group(m.lastgroup or "word"))
        pos = m.end()
        while pos < len(q) and q[pos].isspace():
            pos += 1
    return out


@dataclass
class Soql:
    fields: list[str]
    obj: str
    where: Any
    order: list[tuple[str, bool, bool]]  # field, desc, nulls_last
    limit: int | None
    offset: int
    count_only: bool


class _P:
    def __init__(self, toks: list[str]) -> None:
        self.t = toks
        self.i = 0

    def peek(self) -> str:
        return self.t[self.i] if self.i < len(self.t) else ""

    def kw(self, word: str) -> bool:
        return self.peek().upper() == word

    def take(self) -> str:
        if self.i >= len(self.t):
            raise SoqlError("MALFORMED_QUERY", "unexpected end of query")
        tok = self.t[self.i]
        self.i += 1
        return tok

    def expect(self, word: str) -> None:
        tok = self.take()
        if tok.upper() != word:
            raise SoqlError("MALFORMED_QUERY", f"unexpected token: '{tok}', expected {word}")

    def query(self) -> Soql:
        self.expect("SELECT")
        fields: list[str] = []
        count_only = False
        while True:
            tok = self.take()
            if tok.upper() == "COUNT" and self.peek() == "(":
                self.take()
                self.expect(")")
                count_only = True
            else:
                fields.append(tok)
            if self.peek() != ",":
                break
            self.take()
        self.expect("FROM")
        obj = self.take()
        where = None
        if self.kw("WHERE"):
            self.take()
            where = self.or_expr()
        order: list[tuple[str, bool, bool]] = []
        if self.kw("ORDER"):
            self.take()
            self.expect("BY")
            while True:
                f = self.take()
                desc = False
                if self.kw("ASC") or self.kw("DESC"):
                    desc = self.take().upper() == "DESC"
                nulls_last = desc is False
                if self.kw("NULLS"):
                    self.take()
                    nulls_last = self.take().upper() == "LAST"
                order.append((f, desc, nulls_last))
                if self.peek() != ",":
                    break
                self.take()
        limit = None
        offset = 0
        if self.kw("LIMIT"):
            self.take()
            limit = self._int()
        if self.kw("OFFSET"):
            self.take()
            offset = self._int()
        if self.peek():
            raise SoqlError("MALFORMED_QUERY", f"unexpected token: '{self.peek()}'")
        return Soql(fields, obj, where, order, limit, offset, count_only)

    def _int(self) -> int:
        tok = self.take()
        if not tok.isdigit():
            raise SoqlError("MALFORMED_QUERY", f"expected a number but got '{tok}'")
        return int(tok)

    def or_expr(self) -> Any:
        parts = [self.and_expr()]
        while self.kw("OR"):
            self.take()
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else ("or", parts)

    def and_expr(self) -> Any:
        parts = [self.not_expr()]
        while self.kw("AND"):
            self.take()
            parts.append(self.not_expr())
        return parts[0] if len(parts) == 1 else ("and", parts)

    def not_expr(self) -> Any:
        if self.kw("NOT"):
            self.take()
            return ("not", [self.not_expr()])
        if self.peek() == "(":
            self.take()
            node = self.or_expr()
            self.expect(")")
            return node
        field = self.take()
        op = self.take().upper()
        if op == "NOT" and self.kw("IN"):
            self.take()
            op = "NOT IN"
        if op not in ("=", "!=", "<>", "<", "<=", ">", ">=", "LIKE", "IN", "NOT IN"):
            raise SoqlError("MALFORMED_QUERY", f"unexpected token: '{op}'")
        if op in ("IN", "NOT IN"):
            self.expect("(")
            vals = [self.take()]
            while self.peek() == ",":
                self.take()
                vals.append(self.take())
            self.expect(")")
            return ("cmp", field, op, vals)
        return ("cmp", field, op, self.take())


def _literal(tok: str, today: date) -> Any:
    if tok.startswith("'"):
        return re.sub(r"\\(.)", r"\1", tok[1:-1])
    up = tok.upper()
    if up == "NULL":
        return None
    if up in ("TRUE", "FALSE"):
        return up == "TRUE"
    if up == "TODAY":
        return today
    if up == "YESTERDAY":
        return today - timedelta(days=1)
    if up == "TOMORROW":
        return today + timedelta(days=1)
    m = re.fullmatch(r"(LAST|NEXT)_N_DAYS:(\d+)", up)
    if m:
        n = int(m.group(2))
        return ("range", today - timedelta(days=n), today) if m.group(1) == "LAST" else ("range", today, today + timedelta(days=n))
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", tok):
        return date.fromisoformat(tok)
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}T[\d:.]+(Z|[+-]\d{2}:?\d{2})", tok):
        return datetime.fromisoformat(tok.replace("Z", "+00:00"))
    try:
        return float(tok) if "." in tok else int(tok)
    except ValueError:
        raise SoqlError("MALFORMED_QUERY", f"unexpected token: '{tok}'") from None


def _coerce(value: Any, like: Any) -> Any:
    """Compare record values (JSON) with literals: dates / datetimes as such, the rest as is."""
    if isinstance(like, (date, datetime)) and isinstance(value, str):
        try:
            if isinstance(like, datetime):
                return datetime.fromisoformat(value.replace("Z", "+00:00").replace("+0000", "+00:00"))
            return date.fromisoformat(value[:10])
        except ValueError:
            return value
    if isinstance(like, date) and not isinstance(like, datetime) and isinstance(value, datetime):
        return value.date()
    return value


class Org:
    """Records per object, issued tokens and open query cursors."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.base_url = "http://127.0.0.1"
        self.reset()

    def reset(self) -> None:
        """Forget records and cursors; issued tokens stay valid (as a real org's sessions would)."""
        with self.lock:
            self.records: dict[str, dict[str, dict[str, Any]]] = {o: {} for o in BASE_FIELDS}
            self.fields: dict[str, list[str]] = {o: list(f) for o, f in BASE_FIELDS.items()}
            if not hasattr(self, "tokens"):
                self.tokens: set[str] = set()
            self.cursors: dict[str, list[dict[str, Any]]] = {}
            self.counter = 1
            self.case_number = 1000

    def canonical_object(self, name: str) -> str:
        for o in self.records:
            if o.lower() == name.lower():
                return o
        raise SoqlError("INVALID_TYPE", f"sObject type '{name}' is not supported. If you are attempting to use a custom "
                                        "object, be sure to append the '__c' after the entity name.")

    def canonical_field(self, obj: str, name: str) -> str:
        if "." in name:
            rel, _, rest = name.partition(".")
            if rel.lower() not in (r.lower() for r in RELATIONSHIPS) or obj == "Account":
                raise SoqlError("INVALID_FIELD", f"Didn't understand relationship '{rel}' in field path.")
            target = RELATIONSHIPS[next(r for r in RELATIONSHIPS if r.lower() == rel.lower())][1]
            return f"{target}.{self.canonical_field(target, rest)}"
        for f in self.fields[obj]:
            if f.lower() == name.lower():
                return f
        raise SoqlError("INVALID_FIELD", f"No such column '{name}' on entity '{obj}'. If you are attempting to use a "
                                         "custom field, be sure to append the '__c' after the custom field name.")

    def add(self, obj: str, record: dict[str, Any]) -> dict[str, Any]:
        obj = self.canonical_object(obj)
        rec = dict(record)
        if "Id" not in rec:
            rec["Id"] = f"{ID_PREFIX.get(obj, 'a00')}{'Emu'}{self.counter:09d}AAA"[:18]
            self.counter += 1
        if obj == "Case" and "CaseNumber" not in rec:
            self.case_number += 1
            rec["CaseNumber"] = f"{self.case_number:08d}"
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000+0000")
        rec.setdefault("CreatedDate", now)
        rec.setdefault("LastModifiedDate", rec["CreatedDate"])
        if obj == "Case":
            rec.setdefault("IsClosed", rec.get("Status") in ("Closed", "Resolved"))
            rec.setdefault("IsEscalated", False)
        for key in rec:
            if not any(f.lower() == key.lower() for f in self.fields[obj]):
                self.fields[obj].append(key)
        self.records[obj][rec["Id"]] = rec
        return rec

    def get_value(self, obj: str, rec: dict[str, Any], field: str) -> Any:
        if "." in field:
            rel, _, rest = field.partition(".")
            fk = RELATIONSHIPS[rel][0]
            target = self.records[RELATIONSHIPS[rel][1]].get(rec.get(fk) or "")
            return None if target is None else self.get_value(RELATIONSHIPS[rel][1], target, rest)
        return rec.get(field)

    def run(self, soql: str, api: str) -> tuple[list[dict[str, Any]], int]:
        """Evaluate a query: (records shaped like the API's, totalSize)."""
        q = _P(_tokens(soql)).query()
        obj = self.canonical_object(q.obj)
        fields = [self.canonical_field(obj, f) for f in q.fields]
        today = datetime.now(timezone.utc).date()

        def build(node: Any) -> Callable[[dict[str, Any]], bool]:
            kind = node[0]
            if kind in ("and", "or"):
                parts = [build(n) for n in node[1]]
                return (lambda r: all(p(r) for p in parts)) if kind == "and" else (lambda r: any(p(r) for p in parts))
            if kind == "not":
                inner = build(node[1][0])
                return lambda r: not inner(r)
            _, fname, op, raw = node
            f = self.canonical_field(obj, fname)
            if op in ("IN", "NOT IN"):
                vals = [_literal(v, today) for v in raw]
                def hit(r: dict[str, Any]) -> bool:
                    return any(_eq(_coerce(self.get_value(obj, r, f), v), v) for v in vals)
                return hit if op == "IN" else (lambda r: not hit(r))
            lit = _literal(raw, today)
            if isinstance(lit, tuple):  # LAST_N_DAYS / NEXT_N_DAYS
                _, lo, hi = lit

                def in_range(r: dict[str, Any]) -> bool:
                    v = _coerce(self.get_value(obj, r, f), lo)
                    v = v.date() if isinstance(v, datetime) else v
                    return isinstance(v, date) and lo <= v <= hi
                return in_range if op == "=" else (lambda r: not in_range(r))
            if op == "LIKE":
                if not isinstance(lit, str):
                    raise SoqlError("MALFORMED_QUERY", "LIKE needs a string")
                rx = re.compile("^" + re.escape(lit).replace("%", ".*").replace("_", ".") + "$", re.I | re.S)
                def like(r: dict[str, Any]) -> bool:
                    v = self.get_value(obj, r, f)
                    return isinstance(v, str) and bool(rx.match(v))
                return like
            if op in ("=", "!=", "<>"):
                def eq(r: dict[str, Any]) -> bool:
                    return _eq(_coerce(self.get_value(obj, r, f), lit), lit)
                return eq if op == "=" else (lambda r: not eq(r))
            cmp: Callable[[Any, Any], Any] = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
                                              ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}[op]

            def compare(r: dict[str, Any]) -> bool:
                v = _coerce(self.get_value(obj, r, f), lit)
                if v is None or lit is None:
                    return False
                try:
                    return bool(cmp(v, lit))
                except TypeError:
                    return False
            return compare

        pred = build(q.where) if q.where is not None else (lambda r: True)
        rows = [r for r in self.records[obj].values() if pred(r)]
        for fname, desc, nulls_last in reversed(q.order):
            f = self.canonical_field(obj, fname)
            present = [r for r in rows if self.get_value(obj, r, f) is not None]
            missing = [r for r in rows if self.get_value(obj, r, f) is None]
            present.sort(key=lambda r: _sortable(self.get_value(obj, r, f)), reverse=desc)
            rows = present + missing if nulls_last else missing + present
        rows = rows[q.offset:]
        if q.limit is not None:
            rows = rows[: q.limit]
        if q.count_only:
            return [], len(rows)
        out = []
        for r in rows:
            shaped: dict[str, Any] = {"attributes": {"type": obj, "url": f"/services/data/{api}/sobjects/{obj}/{r['Id']}"}}
            for f in fields:
                if "." in f:
                    rel_obj, _, rest = f.partition(".")
                    rel_name = next(k for k, v in RELATIONSHIPS.items() if v[1] == rel_obj)
                    target = self.records[rel_obj].get(r.get(RELATIONSHIPS[rel_name][0]) or "")
                    if target is None:
                        shaped[rel_name] = None
                    else:
                        node = shaped.setdefault(rel_name, {"attributes": {"type": rel_obj, "url": f"/services/data/{api}/sobjects/{rel_obj}/{target['Id']}"}})
                        node[rest] = target.get(rest)
                else:
                    shaped[f] = r.get(f)
            out.append(shaped)
        return out, len(out)


def _eq(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()  # SOQL string comparison is case-insensitive
    return bool(a == b)


def _sortable(v: Any) -> Any:
    return (0, v.lower()) if isinstance(v, str) else (1, v)


def create_app(*, client_id: str, client_secret: str) -> tuple[Flask, Org]:
    """The Flask app of the Salesforce emulator (client-credentials OAuth with the given client)."""
    app = Flask("emulators.salesforce")
    org = Org()
    faults = FaultInjector()
    add_control_error_handler(app)

    def sf_error(status: int, code: str, message: str) -> Response:
        resp = jsonify([{"message": message, "errorCode": code}])
        resp.status_code = status
        return resp

    @app.before_request
    def gate() -> Response | None:
        if request.path.startswith("/_emulator/"):
            return None
        rule = faults.take(request.method, request.path)
        if rule is not None:
            return apply_fault(rule, lambda s: [{"message": "Injected fault", "errorCode": "REQUEST_LIMIT_EXCEEDED" if s in (403, 429) else "SERVER_UNAVAILABLE"}])
        if request.path.startswith("/services/data/"):
            auth = request.headers.get("Authorization", "")
            token = auth[7:] if auth.startswith("Bearer ") else ""
            with org.lock:
                ok = any(hmac.compare_digest(token.encode(), t.encode()) for t in org.tokens)
            if not ok:
                return sf_error(401, "INVALID_SESSION_ID", "Session expired or invalid")
        return None

    @app.post("/services/oauth2/token")
    def token() -> tuple[Response, int] | Response:
        form = request.form
        if form.get("grant_type") != "client_credentials":
            return jsonify({"error": "unsupported_grant_type", "error_description": "grant type not supported"}), 400
        cid, secret = form.get("client_id", ""), form.get("client_secret", "")
        if request.authorization and request.authorization.type == "basic":
            cid, secret = request.authorization.username or "", request.authorization.password or ""
        if not (hmac.compare_digest(cid.encode(), client_id.encode()) and hmac.compare_digest(secret.encode(), client_secret.encode())):
            return jsonify({"error": "invalid_client", "error_description": "invalid client credentials"}), 400
        access = "00DEMU0000000001!" + secrets.token_urlsafe(48)
        with org.lock:
            org.tokens.add(access)
        now_ms = str(int(datetime.now(timezone.utc).timestamp() * 1000))
        return jsonify({"access_token": access, "instance_url": org.base_url, "token_type": "Bearer",
                        "id": f"{org.base_url}/id/00DEMU0000000001/005EMU0000000001", "issued_at": now_ms,
                        "signature": secrets.token_urlsafe(32), "scope": "api"})

    def batch_size() -> int:
        m = re.search(r"batchSize=(\d+)", request.headers.get("Sforce-Query-Options", ""))
        return min(max(int(m.group(1)), 200), 2000) if m else 2000

    def page(api: str, rows: list[dict[str, Any]], total: int, offset: int, locator: str | None) -> Response:
        size = batch_size()
        chunk = rows[offset: offset + size]
        out: dict[str, Any] = {"totalSize": total, "done": offset + size >= len(rows), "records": chunk}
        if not out["done"]:
            if locator is None:
                locator = "01gEMU" + secrets.token_hex(6).upper()
                with org.lock:
                    org.cursors[locator] = rows
                    if len(org.cursors) > 200:
                        org.cursors.pop(next(iter(org.cursors)))
            out["nextRecordsUrl"] = f"/services/data/{api}/query/{locator}-{offset + size}"
        return jsonify(out)

    @app.get("/services/data/<api>/query")
    @app.get("/services/data/<api>/queryAll")
    def query(api: str) -> Response:
        if not re.fullmatch(r"v\d+\.\d", api):
            return sf_error(404, "NOT_FOUND", "The requested resource does not exist")
        q = request.args.get("q", "")
        if not q.strip():
            return sf_error(400, "MALFORMED_QUERY", "A query string has to be specified")
        try:
            with org.lock:
                rows, total = org.run(q, api)
        except SoqlError as exc:
            return sf_error(400, exc.code, exc.message)
        return page(api, rows, total, 0, None)

    @app.get("/services/data/<api>/query/<locator>")
    def query_more(api: str, locator: str) -> Response:
        cursor, _, offset = locator.rpartition("-")
        with org.lock:
            rows = org.cursors.get(cursor)
        if rows is None or not offset.isdigit():
            return sf_error(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        return page(api, rows, len(rows), int(offset), cursor)

    @app.get("/services/data/<api>/sobjects/<obj>/<rid>")
    def get_record(api: str, obj: str, rid: str) -> Response:
        try:
            with org.lock:
                o = org.canonical_object(obj)
                rec = org.records[o].get(rid)
        except SoqlError as exc:
            return sf_error(404, "NOT_FOUND", exc.message)
        if rec is None:
            return sf_error(404, "NOT_FOUND", "The requested resource does not exist")
        return jsonify({"attributes": {"type": o, "url": f"/services/data/{api}/sobjects/{o}/{rid}"}, **rec})

    @app.post("/_emulator/salesforce/records")
    def seed() -> Response:
        spec = control_json()
        obj, records = spec.get("object"), spec.get("records")
        if not isinstance(obj, str) or not isinstance(records, list):
            raise ValueError("need 'object' and a list of 'records'")
        with org.lock:
            try:
                ids = [org.add(obj, r)["Id"] for r in records]
            except SoqlError as exc:
                raise ValueError(exc.message) from None
        return jsonify({"ids": ids})

    @app.get("/_emulator/salesforce/state")
    def state() -> Response:
        with org.lock:
            return jsonify({"records": {o: list(r.values()) for o, r in org.records.items()}, "tokens_issued": len(org.tokens)})

    @app.post("/_emulator/salesforce/revoke-tokens")
    def revoke() -> Response:
        with org.lock:
            org.tokens.clear()
        return jsonify({"ok": True})

    add_control_routes(app, "salesforce", faults=faults, reset=org.reset)

    @app.errorhandler(404)
    def nf(_: Exception) -> Response:
        return sf_error(404, "NOT_FOUND", "The requested resource does not exist")

    return app, org
