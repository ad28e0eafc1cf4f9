"""A JQL subset for the Jira emulator: parse once, evaluate against in-memory issues.

Supported: `=`, `!=`, `IN`, `NOT IN`, `~`, `!~`, `>`, `>=`, `<`, `<=`, `IS [NOT] EMPTY|NULL`, `AND`, `OR`,
`NOT`, parentheses, `ORDER BY f [ASC|DESC], ...`; values as words, quoted strings, lists, absolute dates
(`2024-01-31`, `2024/01/31 10:00`), relative dates (`-5m`, `-2d`, `-1w`, `4h`) and the functions
`now()`, `currentUser()`, `startOfDay()`, `endOfDay()`, `startOfWeek()`, `startOfMonth()` (with an optional
offset such as `startOfDay(-1d)`). As in Jira, `!=` and `NOT IN` never match issues whose field is empty.
Errors raise `JqlError` with Jira's wording; the API turns them into 400 `errorMessages`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Protocol

OPERATORS = ("=", "!=", "~", "!~", ">", ">=", "<", "<=", "in", "not in", "is", "is not")
_VALID_OPS = "'=', '!=', '<', '>', '<=', '>=', '~', '!~', 'IN', 'NOT IN', 'IS' and 'IS NOT'"
_KEYWORDS = {"and", "or", "not", "in", "is", "empty", "null", "order", "by", "asc", "desc"}
_REL = re.compile(r"^([+-]?)(\d+)([wdhm])$", re.I)
_UNIT = {"w": timedelta(weeks=1), "d": timedelta(days=1), "h": timedelta(hours=1), "m": timedelta(minutes=1)}


class JqlError(ValueError):
    """Invalid JQL, worded as Jira words it."""


@dataclass(frozen=True)
class Tok:
    kind: str  # word | string | op | lparen | rparen | comma | eof
    text: str
    pos: int


def tokenize(jql: str) -> list[Tok]:
    """Split JQL into tokens; quoted strings keep their content, words are runs of non-special characters."""
    out: list[Tok] = []
    i = 0
    n = len(jql)
    while i < n:
        c = jql[i]
        if c.isspace():
            i += 1
        elif c in "\"'":
            j = i + 1
            buf = []
            while j < n and jql[j] != c:
                if jql[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(jql[j])
                j += 1
            if j >= n:
                raise JqlError(f"Error in the JQL Query: The quoted string '{''.join(buf)}' has not been completed. (line 1, character {i + 1})")
            out.append(Tok("string", "".join(buf), i))
            i = j + 1
        elif c == "(":
            out.append(Tok("lparen", c, i))
            i += 1
        elif c == ")":
            out.append(Tok("rparen", c, i))
            i += 1
        elif c == ",":
            out.append(Tok("comma", c, i))
            i += 1
        elif jql.startswith(("!=", ">=", "<=", "!~"), i):
            out.append(Tok("op", jql[i:i + 2], i))
            i += 2
        elif c in "=~<>":
            out.append(Tok("op", c, i))
            i += 1
        else:
            j = i
            while j < n and not jql[j].isspace() and jql[j] not in "\"'(),=~<>!":
                j += 1
            if j == i:
                raise JqlError(f"Error in the JQL Query: The character '{c}' is a reserved JQL character. (line 1, character {i + 1})")
            out.append(Tok("word", jql[i:j], i))
            i = j
    out.append(Tok("eof", "", n))
    return out


@dataclass(frozen=True)
class Value:
    """A literal, a list, EMPTY, or a function call."""

    kind: str  # literal | list | empty | func
    text: str = ""
    items: tuple["Value", ...] = ()
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Clause:
    field: str
    op: str
    value: Value


@dataclass(frozen=True)
class BoolNode:
    op: str  # and | or | not
    children: tuple[Any, ...]


@dataclass(frozen=True)
class Query:
    where: Any  # Clause | BoolNode | None
    order_by: tuple[tuple[str, bool], ...]  # (field, descending)


class _Parser:
    def __init__(self, jql: str) -> None:
        self.toks = tokenize(jql)
        self.i = 0

    def peek(self) -> Tok:
        return self.toks[self.i]

    def next(self) -> Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def is_kw(self, word: str) -> bool:
        tok = self.peek()
        return tok.kind == "word" and tok.text.lower() == word

    def fail(self, msg: str, tok: Tok | None = None) -> JqlError:
        tok = tok or self.peek()
        return JqlError(f"Error in the JQL Query: {msg} (line 1, character {tok.pos + 1})")

    def parse(self) -> Query:
        where = None
        if not self.is_kw("order") and self.peek().kind != "eof":
            where = self.expr()
        order: list[tuple[str, bool]] = []
        if self.is_kw("order"):
            self.next()
            if not self.is_kw("by"):
                raise self.fail("Expecting 'BY' but got '%s'." % self.peek().text)
            self.next()
            while True:
                tok = self.next()
                if tok.kind not in ("word", "string"):
                    raise self.fail(f"Expecting a field name but got '{tok.text}'.", tok)
                desc = False
                if self.is_kw("asc") or self.is_kw("desc"):
                    desc = self.next().text.lower() == "desc"
                order.append((tok.text, desc))
                if self.peek().kind != "comma":
                    break
                self.next()
        if self.peek().kind != "eof":
            tok = self.peek()
            raise self.fail(f"Expecting either 'OR' or 'AND' but got '{tok.text}'.", tok)
        return Query(where, tuple(order))

    def expr(self) -> Any:
        node = self.and_expr()
        children = [node]
        while self.is_kw("or"):
            self.next()
            children.append(self.and_expr())
        return node if len(children) == 1 else BoolNode("or", tuple(children))

    def and_expr(self) -> Any:
        children = [self.not_expr()]
        while self.is_kw("and"):
            self.next()
            children.append(self.not_expr())
        return children[0] if len(children) == 1 else BoolNode("and", tuple(children))

    def not_expr(self) -> Any:
        if self.is_kw("not"):
            self.next()
            return BoolNode("not", (self.not_expr(),))
        if self.peek().kind == "lparen":
            self.next()
            node = self.expr()
            if self.peek().kind != "rparen":
                raise self.fail(f"Expecting ')' but got '{self.peek().text or '<EOF>'}'.")
            self.next()
            return node
        return self.clause()

    def clause(self) -> Clause:
        tok = self.next()
        if tok.kind not in ("word", "string") or (tok.kind == "word" and tok.text.lower() in _KEYWORDS):
            raise self.fail(f"Expecting a field name but got '{tok.text or '<EOF>'}'.", tok)
        field = tok.text
        if re.fullmatch(r"cf\[\d+\]", field, re.I):
            field = "customfield_" + re.sub(r"\D", "", field)
        op_tok = self.next()
        if op_tok.kind == "op":
            op = op_tok.text
        elif op_tok.kind == "word" and op_tok.text.lower() == "in":
            op = "in"
        elif op_tok.kind == "word" and op_tok.text.lower() == "not" and self.is_kw("in"):
            self.next()
            op = "not in"
        elif op_tok.kind == "word" and op_tok.text.lower() == "is":
            op = "is"
            if self.is_kw("not"):
                self.next()
                op = "is not"
        else:
            raise self.fail(f"Expecting operator but got '{op_tok.text or '<EOF>'}'. The valid operators are {_VALID_OPS}.", op_tok)
        value = self.value(op)
        return Clause(field, op, value)

    def value(self, op: str) -> Value:
        tok = self.peek()
        if op in ("is", "is not"):
            if tok.kind == "word" and tok.text.lower() in ("empty", "null"):
                self.next()
                return Value("empty")
            raise self.fail(f"Expecting 'EMPTY' or 'NULL' after '{op.upper()}' but got '{tok.text}'.", tok)
        if op in ("in", "not in"):
            if tok.kind != "lparen":
                if tok.kind == "word" and re.fullmatch(r"\w+", tok.text) and self.toks[self.i + 1].kind == "lparen":
                    return self.single()
                raise self.fail(f"Expecting '(' but got '{tok.text}'.", tok)
            self.next()
            items = [self.single()]
            while self.peek().kind == "comma":
                self.next()
                items.append(self.single())
            if self.peek().kind != "rparen":
                raise self.fail(f"Expecting ')' but got '{self.peek().text or '<EOF>'}'.")
            self.next()
            return Value("list", items=tuple(items))
        return self.single()

    def single(self) -> Value:
        tok = self.next()
        if tok.kind == "string":
            return Value("literal", tok.text)
        if tok.kind != "word":
            raise self.fail(f"Expecting either a value, list or function but got '{tok.text or '<EOF>'}'.", tok)
        if tok.text.lower() in ("empty", "null"):
            return Value("empty")
        if tok.text.lower() in ("and", "or", "order"):
            raise self.fail(f"Expecting either a value, list or function but got '{tok.text}'.", tok)
        if self.peek().kind == "lparen":
            self.next()
            args: list[str] = []
            while self.peek().kind not in ("rparen", "eof"):
                arg = self.next()
                if arg.kind in ("word", "string"):
                    args.append(arg.text)
                elif arg.kind != "comma":
                    raise self.fail(f"Unexpected '{arg.text}' in function arguments.", arg)
            if self.peek().kind != "rparen":
                raise self.fail("Expecting ')' to close the function call.")
            self.next()
            return Value("func", tok.text, args=tuple(args))
        return Value("literal", tok.text)


def parse(jql: str) -> Query:
    """Parse JQL (raises JqlError with Jira's wording)."""
    return _Parser(jql or "").parse()


# ---------------------------------------------------------------- evaluation

class Resolver(Protocol):
    """What the evaluator needs to know about issues and fields."""

    def field_kind(self, field: str) -> str | None:
        """'text' | 'date' | 'number' | 'value' | 'issuelinktype', or None for an unknown field."""

    def values(self, issue: Any, field: str) -> list[str]:
        """Comparable string values (names, ids, keys) of a field; empty list = EMPTY."""

    def text(self, issue: Any, field: str) -> str:
        """The searchable text of a field (for ~)."""

    def date(self, issue: Any, field: str) -> datetime | None:
        """The datetime value of a date field."""

    def number(self, issue: Any, field: str) -> float | None:
        """The numeric value of a number field."""

    def check_value(self, field: str, value: str) -> None:
        """Raise JqlError if `value` cannot exist for `field` (e.g. an unknown project)."""

    def current_user(self) -> list[str]:
        """Identifiers of the calling user."""

    def now(self) -> datetime:
        """The clock JQL's relative dates use."""

    def sort_key(self, issue: Any, field: str) -> Any:
        """A sortable key for ORDER BY."""


def parse_date(text: str, now: datetime, *, end: bool = False) -> datetime:
    """Absolute (`2024-01-31`, `2024/01/31 10:00`) or relative (`-5m`, `-2d`) JQL dates, UTC."""
    text = text.strip()
    m = _REL.match(text)
    if m:
        sign = -1 if m.group(1) == "-" else 1
        return now + sign * int(m.group(2)) * _UNIT[m.group(3).lower()]
    for fmt in ("%Y-%m-%d %H:%M", "%Y/%m/%d %H:%M", "%Y-%m-%d", "%Y/%m/%d"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
    raise JqlError(f"Date value '{text}' for field is invalid. Valid formats include: 'yyyy/MM/dd HH:mm', "
                   f"'yyyy-MM-dd HH:mm', 'yyyy/MM/dd', 'yyyy-MM-dd', or a period format e.g. '-5d', '4w 2d'.")


def _func_date(v: Value, now: datetime) -> datetime:
    name = v.text.lower()
    offset = parse_date(v.args[0], now) - now if v.args else timedelta(0)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if name == "now":
        base = now
    elif name == "startofday":
        base = day
    elif name == "endofday":
        base = day + timedelta(days=1) - timedelta(microseconds=1)
    elif name == "startofweek":
        base = day - timedelta(days=(day.weekday() + 1) % 7)  # Jira weeks start on Sunday
    elif name == "startofmonth":
        base = day.replace(day=1)
    else:
        raise JqlError(f"Unable to find JQL function '{v.text}()'.")
    return base + offset


def _literals(v: Value, r: Resolver) -> list[str]:
    if v.kind == "literal":
        return [v.text]
    if v.kind == "list":
        return [s for item in v.items for s in _literals(item, r)]
    if v.kind == "func":
        if v.text.lower() == "currentuser":
            return r.current_user()
        raise JqlError(f"Unable to find JQL function '{v.text}()' usable here.")
    return []


def _words(text: str) -> list[str]:
    return re.findall(r"[\w*]+", text.lower())


def _text_match(haystack: str, needle: str) -> bool:
    """Jira-like text search: every term must occur (a trailing * matches a prefix; "quoted" = phrase)."""
    hay = haystack.lower()
    if len(needle) > 1 and needle.startswith('"') and needle.endswith('"'):
        return needle[1:-1].lower() in hay
    tokens = set(re.findall(r"\w+", hay))
    for term in _words(needle):
        if term.endswith("*"):
            stem = term.rstrip("*")
            if not any(t.startswith(stem) for t in tokens):
                return False
        elif term not in tokens and not any(t.startswith(term) and len(term) >= 4 and t[len(term):] in ("s", "es", "ed", "ing") for t in tokens):
            return False
    return True


def compile_query(q: Query, r: Resolver) -> Callable[[Any], bool]:
    """Turn a parsed query into a predicate over issues, validating fields and values first."""
    now = r.now()

    def build(node: Any) -> Callable[[Any], bool]:
        if node is None:
            return lambda _i: True
        if isinstance(node, BoolNode):
            parts = [build(c) for c in node.children]
            if node.op == "and":
                return lambda i: all(p(i) for p in parts)
            if node.op == "or":
                return lambda i: any(p(i) for p in parts)
            inner = parts[0]
            return lambda i: not inner(i)
        return clause(node)

    def clause(c: Clause) -> Callable[[Any], bool]:
        field = c.field
        kind = r.field_kind(field)
        if kind is None:
            raise JqlError(f"Field '{field}' does not exist or you do not have permission to view it.")
        op = c.op.lower()
        if op in ("is", "is not"):
            empty = op == "is"
            if kind == "date":
                return lambda i: (r.date(i, field) is None) == empty
            if kind == "text":
                return lambda i: (r.text(i, field).strip() == "") == empty
            return lambda i: (len(r.values(i, field)) == 0) == empty
        if op in ("~", "!~"):
            if kind not in ("text",):
                raise JqlError(f"The operator '{c.op}' is not supported by the '{field}' field.")
            needles = _literals(c.value, r)
            if op == "~":
                return lambda i: all(_text_match(r.text(i, field), n) for n in needles)
            return lambda i: bool(r.text(i, field)) and not all(_text_match(r.text(i, field), n) for n in needles)
        if op in (">", ">=", "<", "<="):
            if kind == "date":
                if c.value.kind == "func":
                    bound = _func_date(c.value, now)
                elif c.value.kind == "literal":
                    bound = parse_date(c.value.text, now)
                else:
                    raise JqlError(f"The operator '{c.op}' does not support a list value.")
                cmp = _CMP[op]
                return lambda i: (d := r.date(i, field)) is not None and cmp(d, bound)
            if kind == "number":
                try:
                    num = float(c.value.text)
                except ValueError:
                    raise JqlError(f"The value '{c.value.text}' is not a valid number for field '{field}'.") from None
                cmp = _CMP[op]
                return lambda i: (x := r.number(i, field)) is not None and cmp(x, num)
            raise JqlError(f"The operator '{c.op}' is not supported by the '{field}' field.")
        # = != in, not in
        if c.value.kind == "empty":
            if op in ("=", "in"):
                return lambda i: len(r.values(i, field)) == 0
            return lambda i: len(r.values(i, field)) > 0
        if kind == "text":
            raise JqlError(f"The operator '{c.op}' is not supported by the '{field}' field.")
        if op in ("=", "!=") and c.value.kind == "list":
            raise JqlError(f"The operator '{c.op}' does not support the list value for field '{field}'.")
        if kind == "date":
            bound = _func_date(c.value, now) if c.value.kind == "func" else parse_date(c.value.text, now)
            def eq(i: Any) -> bool:
                d = r.date(i, field)
                return d is not None and abs((d - bound).total_seconds()) < 60

            return eq if op == "=" else (lambda i: r.date(i, field) is not None and not eq(i))
        wanted = _literals(c.value, r)
        for w in wanted:
            r.check_value(field, w)
        wanted_l = {w.lower() for w in wanted}
        has_empty = c.value.kind == "list" and any(v.kind == "empty" for v in c.value.items)

        def match(i: Any) -> bool:
            vals = r.values(i, field)
            if not vals:
                return has_empty
            return any(v.lower() in wanted_l for v in vals)

        if op in ("=", "in"):
            return match
        # Jira: != and NOT IN never return issues whose field is empty (unless EMPTY is listed).
        return lambda i: (bool(r.values(i, field)) and not match(i)) if not has_empty else not match(i)

    return build(q.where)


_CMP: dict[str, Callable[[Any, Any], bool]] = {
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b}


def sort_issues(issues: list[Any], q: Query, r: Resolver) -> list[Any]:
    """Apply ORDER BY (stable, last key first); default order is newest id first."""
    out = sorted(issues, key=lambda i: r.sort_key(i, "id"), reverse=True)
    for field, desc in reversed(q.order_by):
        if r.field_kind(field) is None:
            raise JqlError(f"Not able to sort using field '{field}'.")
        present = [i for i in out if r.sort_key(i, field) is not None]
        missing = [i for i in out if r.sort_key(i, field) is None]
        present.sort(key=lambda i: r.sort_key(i, field), reverse=desc)
        # Jira puts empty values last in ascending order and first in descending order.
        out = missing + present if desc else present + missing
    return out
