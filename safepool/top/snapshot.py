"""What ``top`` shows: pg_stat_activity read in one query, reduced to one row
per (application_name, state), with the server's connection limits.

``aggregate()`` is a pure function of the session rows, so the grouping and
the alarms are testable without a server. Ages are computed by the server
(``now() - state_change``): a client with a wrong clock cannot distort them.

Query text is selected only when asked for (``--show-queries``): it can carry
literals, parameters and secrets.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from .._secrets import redact as _redact

Level = Literal["ok", "warning", "critical"]
AlertLevel = Literal["note", "warning", "critical"]

IDLE_IN_TRANSACTION = ("idle in transaction", "idle in transaction (aborted)")
# Display order within an application: work first, then what holds a
# transaction open, then the harmless idle ones.
_STATE_ORDER = {
    "active": 0,
    "idle in transaction": 1,
    "idle in transaction (aborted)": 2,
    "fastpath function call": 3,
    "disabled": 4,
    "idle": 5,
}

# Client backends only: autovacuum, WAL writers and other background processes
# have their own slots and do not count against max_connections. A session of
# another role shows backend_type NULL to a role without pg_read_all_stats;
# `datid IS NOT NULL` keeps those (client backends always have a database)
# and drops most background processes.
_ACTIVITY_SQL = """
SELECT coalesce(application_name, '') AS application_name,
       state,
       coalesce(wait_event_type = 'Lock', false) AS waiting_on_lock,
       extract(epoch FROM now() - state_change)::float8 AS state_age,
       extract(epoch FROM now() - xact_start)::float8 AS transaction_age,
       CASE WHEN state = 'active' THEN extract(epoch FROM now() - query_start)::float8 END AS query_age,
       {query_column} AS query
FROM pg_stat_activity
WHERE backend_type = 'client backend' OR (backend_type IS NULL AND datid IS NOT NULL)
"""


def _age(seconds: float | None) -> float | None:
    """An age from the activity query, never below zero: now() is the
    snapshot transaction's start, and its own session changed state a moment
    later (a few ms below zero otherwise). None stays None."""
    return None if seconds is None else max(0.0, seconds)


_QUERY_COLUMN = "CASE WHEN state IS NOT NULL THEN left(query, {limit}) END"

_SERVER_SQL = """
SELECT now() AS taken_at,
       current_setting('server_version') AS version,
       current_user AS user_name,
       current_database() AS database,
       host(inet_server_addr()) AS host,
       inet_server_port() AS port,
       current_setting('max_connections')::int AS max_connections,
       current_setting('superuser_reserved_connections')::int AS superuser_reserved,
       coalesce(current_setting('reserved_connections', true), '0')::int AS reserved
"""


@dataclass(frozen=True)
class Session:
    """One client backend as pg_stat_activity shows it; ages in seconds."""

    application_name: str
    state: str | None  # None: another role's session, hidden without pg_read_all_stats
    waiting_on_lock: bool = False
    state_age: float | None = None
    transaction_age: float | None = None
    query_age: float | None = None  # active sessions only
    query: str | None = None


@dataclass(frozen=True)
class ServerInfo:
    version: str
    user: str
    database: str
    address: str
    max_connections: int
    superuser_reserved_connections: int
    reserved_connections: int = 0  # PostgreSQL 16+: slots for pg_use_reserved_connections

    @property
    def limits(self) -> str:
        text = f"max_connections {self.max_connections}, {self.superuser_reserved_connections} reserved for superusers"
        if self.reserved_connections:
            text += f", {self.reserved_connections} for pg_use_reserved_connections"
        return text

    @property
    def available(self) -> int:
        """Connections open to roles that have no reserved slots."""
        return max(self.max_connections - self.superuser_reserved_connections - self.reserved_connections, 0)


@dataclass(frozen=True)
class Thresholds:
    idle_in_transaction: float = 60.0  # seconds idle inside a transaction before a group is flagged
    usage_warning: float = 0.8  # fraction of ServerInfo.available


@dataclass(frozen=True)
class Group:
    application_name: str
    state: str | None  # None: hidden sessions
    count: int
    waiting_on_lock: int
    oldest_state_age: float | None
    oldest_transaction_age: float | None
    longest_query: float | None
    query: str | None  # the oldest session's, only with --show-queries
    alert: bool  # idle in transaction for longer than the threshold


@dataclass(frozen=True)
class Alert:
    level: AlertLevel
    message: str


@dataclass(frozen=True)
class Snapshot:
    taken_at: datetime
    server: ServerInfo
    thresholds: Thresholds
    total: int  # client backends, hidden ones included
    hidden: int
    waiting_on_lock: int
    by_state: tuple[tuple[str, int], ...]
    groups: tuple[Group, ...]
    level: Level
    alerts: tuple[Alert, ...]

    @property
    def usage(self) -> float:
        """total / available (1.0 and more: ordinary roles are refused)."""
        return _usage(self.total, self.server.available)

    @property
    def usage_level(self) -> Level:
        return _usage_level(self.total, self.server.available, self.thresholds)

    def to_dict(self) -> dict[str, Any]:
        server = self.server
        return {
            "taken_at": self.taken_at.isoformat(),
            "server": {
                "version": server.version,
                "user": server.user,
                "database": server.database,
                "address": server.address,
                "max_connections": server.max_connections,
                "superuser_reserved_connections": server.superuser_reserved_connections,
                "reserved_connections": server.reserved_connections,
                "available": server.available,
            },
            "total": self.total,
            "usage": round(self.usage, 4),
            "hidden": self.hidden,
            "waiting_on_lock": self.waiting_on_lock,
            "by_state": dict(self.by_state),
            "level": self.level,
            "thresholds": {
                "idle_in_transaction_seconds": self.thresholds.idle_in_transaction,
                "usage_warning": self.thresholds.usage_warning,
            },
            "alerts": [{"level": alert.level, "message": alert.message} for alert in self.alerts],
            "groups": [_group_dict(group) for group in self.groups],
        }


def _group_dict(group: Group) -> dict[str, Any]:
    data: dict[str, Any] = {
        "application_name": group.application_name,
        "state": group.state,
        "count": group.count,
        "waiting_on_lock": group.waiting_on_lock,
        "oldest_state_age_seconds": _rounded(group.oldest_state_age),
        "oldest_transaction_age_seconds": _rounded(group.oldest_transaction_age),
        "longest_query_seconds": _rounded(group.longest_query),
        "alert": group.alert,
    }
    if group.query is not None:
        data["query"] = group.query
    return data


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def format_age(seconds: float | None) -> str:
    """``0.4s``, ``12s``, ``3m12s``, ``2h05m``, ``3d04h``; ``-`` for none."""
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _usage(total: int, available: int) -> float:
    return total / available if available else 1.0


def _usage_level(total: int, available: int, thresholds: Thresholds) -> Level:
    if total >= available:
        return "critical"
    if _usage(total, available) >= thresholds.usage_warning:
        return "warning"
    return "ok"


def _max(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return max(present) if present else None


# SQL's lexical pieces that can hold the word PASSWORD without it being the
# keyword, and the literals that can follow it (PostgreSQL's lexer, scan.l:
# standard, E'', U&'', B''/X''/N'' strings, dollar quotes, quoted names,
# comments). A piece cut open by the activity query's truncation runs to
# the end.
_SQL_PIECE = re.compile(
    r"""(?P<comment>--[^\n\r]*)"""
    r"""|(?P<block>/\*)"""
    r"""|(?P<name>"(?:[^"]|"")*(?:"|\Z))"""
    # An escape string (E'...'): backslash escapes; any other kind: none
    # (standard_conforming_strings, on since PostgreSQL 9.1).
    r"""|(?P<literal>(?<![\w$])[Ee]'(?:[^'\\]|''|\\[\s\S]?)*(?:'|\Z)"""
    r"""|(?:(?<![\w$])(?:[BbXxNn]|[Uu]&))?'(?:[^']|'')*(?:'|\Z)"""
    r"""|(?<![\w$])(?P<tag>\$(?:[^\W\d]\w*)?\$)[\s\S]*?(?:(?P=tag)|\Z))"""
    r"""|(?P<word>[^\W\d][\w$]*)"""
)
_BLOCK_EDGE = re.compile(r"/\*|\*/")
# A libpq connection string's password inside a literal, as SQL quotes it:
# spaces around "=", a value in (doubled) quotes.
_CONNINFO_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)(''(?:[^']|'(?!'))*(?:''|$)|[^\s']+)")
# The same in a string's value (its quotes undone): libpq's syntax, a value
# in single quotes with backslash escapes or a run without spaces; also the
# PGPASSWORD of a shell command (COPY ... FROM PROGRAM), in double quotes too.
# (A backslash may end the text: a value cut right after one.)
_CONNINFO_VALUE = re.compile(
    r"""(?i)(\b(?:pg)?password\s*=\s*)"""
    r"""('(?:[^'\\]|\\[\s\S]?)*(?:'|$)|"(?:[^"\\]|\\[\s\S]?)*(?:"|$)|(?:[^\s'"\\]|\\[\s\S]?)+)"""
)
# The same to the end of the value, where its escapes are not decoded here
# (a U&'' string, whose escape character UESCAPE may name after it).
_CONNINFO_REST = re.compile(r"(?i)(\b(?:pg)?password\s*=\s*)[\s\S]+")
# A value ending in a backslash at the end of a plain string: written for
# standard_conforming_strings=off, the quote after it continues the string
# ('... password=\'secret\''), which this scan ended there.
_CONNINFO_OPEN = re.compile(r"(?i)\b(?:pg)?password\s*=\s*\S*\\$")
# A format() placeholder for a connection string's password
# (format('host=h password=%s', ...), in quotes too): the value is a later
# argument.
_CONNINFO_PLACEHOLDER = re.compile(r"""(?i)\b(?:pg)?password\s*=\s*['"]?%(?:\d+\$)?-?\d*[sIL]""")


def _block_end(query: str, start: int) -> int:
    """Where the block comment opened at ``start`` ends: PostgreSQL's nest
    (the end of ``query`` if it was cut open)."""
    depth = 0
    for edge in _BLOCK_EDGE.finditer(query, start):
        depth += 1 if edge.group(0) == "/*" else -1
        if depth == 0:
            return edge.end()
    return len(query)


# A string's own statements are scanned too (a DO block's or a function's
# body, the text given to dblink_exec() or EXECUTE), this many strings deep;
# a string nested deeper is shown as '***' whole (the scan stays linear).
_NESTING = 4
# A format() placeholder (EXECUTE format('... PASSWORD %L', ...)): the
# password is an argument, one of the literals after the string.
_PLACEHOLDER = re.compile(r"\s*%(?:\d+\$)?-?\d*[sIL]")
# A string's prefix, body and closing quote (the body runs to the end of a
# string cut open): escape strings take backslash escapes, the others none.
_ESCAPE_STRING = re.compile(r"([Ee]')((?:[^'\\]|''|\\[\s\S]?)*)('?)")
_PLAIN_STRING = re.compile(r"((?:[BbXxNn]|[Uu]&)?')((?:[^']|'')*)('?)")
# An escape string's escapes, one at a time: octal, hexadecimal and Unicode
# code points, the C escapes, and a backslash before any other character
# (that character); PostgreSQL's scan.l.
_ESCAPE = re.compile(r"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8})|([\s\S]))|''")
_C_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _mask_secrets(query: str) -> str:
    """``query`` without the secrets a statement can carry as literals: the
    literal after the keyword PASSWORD (``CREATE``/``ALTER ROLE ...
    PASSWORD '...'``, a user mapping's ``password '...'`` or ``"password"
    '...'``, with comments between or the literal continued on the next
    line), and a connection string's password inside any literal
    (``CONNECTION 'host=h password=...'``,
    ``dblink('postgresql://u:pw@h/d')``). A string is scanned as
    statements too, since it can hold code the server runs: a DO block's
    body (migrations create roles in one: PostgreSQL has no ``CREATE ROLE
    IF NOT EXISTS``) or the text given to ``dblink_exec()``. Where such a
    string leaves the password to what follows it (``format('... PASSWORD
    %L', ...)``, ``'... PASSWORD ' || ...``), every later literal of the
    statement is masked, if the string names a role or user (``'Enter
    your password ' || name`` masks nothing). The word password in a
    comment, or in a string as anything but the keyword, masks nothing.
    Linear in the query's length."""
    return _scan(query, 0)[0]


def _scan(query: str, depth: int) -> tuple[str, bool, bool]:
    """:func:`_mask_secrets` of ``query``, the body of a string ``depth``
    strings deep, and what it leaves to the statement around it: whether
    it ends with the keyword PASSWORD (a concatenation appends the value),
    and whether a format() placeholder follows the keyword (an argument is
    the value); both only after the word ROLE or USER (role DDL, a user
    mapping), so that a string of prose does not mask the rest."""
    out: list[str] = []
    position = 0
    after_keyword = False  # the last word was PASSWORD: its literal is next
    masked_literal = False  # a literal was masked: one continuing it goes too
    placeholder = False  # PASSWORD %L: the value is a format() argument
    concatenated = False  # a string ended with PASSWORD: `||` appends the value
    mask_rest = False  # a string left its password to a later literal
    role_ddl = False  # the word ROLE or USER came before (a string's statement)
    while (piece := _SQL_PIECE.search(query, position)) is not None:
        between = query[position : piece.start()]
        out.append(between)
        if between.strip():
            if concatenated and between.lstrip().startswith("||"):
                mask_rest = True
            after_keyword = masked_literal = concatenated = False
        kind = piece.lastgroup
        if kind == "block":
            position = _block_end(query, piece.start())
            out.append(query[piece.start() : position])
            continue
        position = piece.end()
        text = piece.group(0)
        if kind == "comment":
            out.append(text)
            continue
        if kind in ("literal", "tag"):
            continuing = masked_literal and ("\n" in between or "\r" in between) and text.startswith("'")
            if after_keyword or continuing or mask_rest:
                out.append("" if continuing else "'***'")
                masked_literal = True
                concatenated = False
            else:
                text, concatenated, formatted, cut_off = _scan_string(text, piece.group("tag"), depth)
                out.append(_redact(text, None))
                if cut_off:
                    # (Where the string may go on, all that follows goes.)
                    out.append(" ***")
                    return "".join(out), False, placeholder
                mask_rest = mask_rest or formatted
                masked_literal = False
            after_keyword = False
            continue
        word = (text if kind == "word" else text[1:-1]).lower()
        after_keyword = word == "password"
        role_ddl = role_ddl or word == "role" or word == "user"
        if after_keyword and role_ddl and _PLACEHOLDER.match(query, position):
            placeholder = True
        masked_literal = concatenated = False
        out.append(text)
    out.append(query[position:])
    return "".join(out), after_keyword and role_ddl, placeholder


def _scan_string(text: str, tag: str | None, depth: int) -> tuple[str, bool, bool, bool]:
    """A literal (``text``; ``tag``, a dollar quote's) with its body
    scanned as statements (:func:`_scan`'s answer for it), and whether the
    string may go on past where this scan ended it (:data:`_CONNINFO_OPEN`):
    then everything after it is masked."""
    if depth >= _NESTING:
        return "'***'", False, False, False
    if tag is not None:
        closed = len(text) >= 2 * len(tag) and text.endswith(tag)
        body = text[len(tag) : len(text) - len(tag) if closed else None]
        masked, dangling, formatted = _scan_value(body, depth, _CONNINFO_VALUE)
        return tag + masked + (tag if closed else ""), dangling, formatted, False
    match = (_ESCAPE_STRING if text[0] in "Ee" else _PLAIN_STRING).fullmatch(text)
    if match is None:  # (not a string as _SQL_PIECE matches them: as it is, its password masked)
        return _CONNINFO_PASSWORD.sub(r"\1***", text), False, False, False
    opening, body, closing = match.groups()
    escaped = opening[0] in "Ee"
    # Its value, as the server reads it (and libpq a connection string in
    # it); a U&'' string's escapes are not decoded: a password in it is
    # masked to the string's end.
    body = _ESCAPE.sub(_unescape, body) if escaped else body.replace("''", "'")
    unicode = opening[0] in "Uu"
    masked, dangling, formatted = _scan_value(body, depth, _CONNINFO_REST if unicode else _CONNINFO_VALUE)
    cut_off = not escaped and not unicode and _CONNINFO_OPEN.search(body) is not None
    if masked == body:  # (shown as written: E'it\'s' keeps its backslash)
        return text, dangling, formatted, cut_off
    if escaped:
        masked = masked.replace("\\", "\\\\")
    return opening + masked.replace("'", "''") + closing, dangling, formatted, cut_off


def _scan_value(body: str, depth: int, password: re.Pattern[str]) -> tuple[str, bool, bool]:
    """:func:`_scan` of a string's value (``body``, its quotes undone), with
    a connection string's password in it masked (``password``: as libpq
    reads one, ``password='a b'``, ``password = 'it\\'s'``,
    ``PGPASSWORD="..."``; or to the end); a format() placeholder for it
    leaves the value to a later argument."""
    masked, dangling, formatted = _scan(body, depth + 1)
    return (
        password.sub(r"\1***", masked),
        dangling,
        formatted or _CONNINFO_PLACEHOLDER.search(body) is not None,
    )


def _unescape(escape: re.Match[str]) -> str:
    """One escape of an escape string (:data:`_ESCAPE`), as its character; a
    code point PostgreSQL refuses (0, past U+10FFFF) as ``?``."""
    if escape.group(0) == "''":
        return "'"
    octal, hexadecimal, short, long, other = escape.groups()
    if other is not None:
        return _C_ESCAPES.get(other, other)
    code = int(octal, 8) if octal else int(hexadecimal or short or long, 16)
    return chr(code) if 0 < code <= 0x10FFFF else "?"


def _one_line(query: str | None, width: int) -> str | None:
    """``query`` on one line of at most ``width`` characters, its secrets
    masked; ending in "…" when cut here or by the server (the query column
    fetches ``left(query, width * 4)``: text that long may have been cut
    there, and its whitespace collapsed can fit the width; review s63)."""
    if query is None:
        return None
    cut = len(query) >= _fetched(width)
    # (pg_stat_activity shows a role's DDL with its password: a migration's,
    # a rotation's, in a session left idle in transaction.)
    text = " ".join(_mask_secrets(query).split())
    if not text.isprintable():
        # Any client writes its query text: its escape sequences (and bidi
        # overrides) must not reach the operator's terminal.
        text = "".join(char if char.isprintable() else "?" for char in text)
    return text if len(text) <= width and not cut else text[: max(width - 1, 0)] + "…"


def _fetched(width: int) -> int:
    """How many characters of a query the snapshot fetches for ``width``."""
    return int(width) * 4


def aggregate(
    sessions: Iterable[Session],
    server: ServerInfo,
    taken_at: datetime,
    thresholds: Thresholds | None = None,
    query_width: int = 80,
) -> Snapshot:
    thresholds = thresholds or Thresholds()
    buckets: dict[tuple[str, str | None], list[Session]] = {}
    for session in sessions:
        buckets.setdefault((session.application_name, session.state), []).append(session)

    groups: list[Group] = []
    for (application_name, state), members in buckets.items():
        oldest = max(members, key=lambda s: -1.0 if s.state_age is None else s.state_age)
        oldest_state_age = _max(s.state_age for s in members)
        leak_suspect = (
            state in IDLE_IN_TRANSACTION
            and oldest_state_age is not None
            and oldest_state_age >= thresholds.idle_in_transaction
        )
        groups.append(
            Group(
                application_name=application_name,
                state=state,
                count=len(members),
                waiting_on_lock=sum(s.waiting_on_lock for s in members),
                oldest_state_age=oldest_state_age,
                oldest_transaction_age=_max(s.transaction_age for s in members),
                longest_query=_max(s.query_age for s in members),
                query=_one_line(oldest.query, query_width),
                alert=leak_suspect,
            )
        )

    per_application = Counter[str]()
    for group in groups:
        per_application[group.application_name] += group.count
    # The biggest consumer first: during a leak, the culprit tops the list.
    groups.sort(
        key=lambda g: (
            -per_application[g.application_name],
            g.application_name,
            _STATE_ORDER.get(g.state or "", len(_STATE_ORDER)),
            g.state or "",
        )
    )

    visible = Counter[str]()
    for group in groups:
        if group.state is not None:
            visible[group.state] += group.count
    hidden = sum(g.count for g in groups if g.state is None)
    total = sum(g.count for g in groups)
    by_state = tuple(sorted(visible.items(), key=lambda item: (_STATE_ORDER.get(item[0], len(_STATE_ORDER)), item[0])))

    alerts: list[Alert] = []
    available = server.available
    level = _usage_level(total, available, thresholds)
    if level == "critical":
        alerts.append(
            Alert(
                "critical",
                f"{total} connections, {available} open to ordinary roles ({server.limits}): new connections are refused",
            )
        )
    elif level == "warning":
        alerts.append(
            Alert("warning", f"{total} of {available} connections in use ({total / available:.0%}; {server.limits})")
        )
    for group in groups:
        if group.alert:
            if level == "ok":
                level = "warning"
            alerts.append(
                Alert(
                    "warning",
                    f"{group.application_name or '(no application_name)'}: {group.count} {group.state}, "
                    f"the oldest for {format_age(group.oldest_state_age)} (over {format_age(thresholds.idle_in_transaction)}): "
                    "a leaked connection or a forgotten transaction?",
                )
            )
    if hidden:
        alerts.append(
            Alert(
                "note",
                f"{hidden} session(s) of other roles hide their state: connect as a role with pg_read_all_stats "
                "(or pg_monitor) to see them",
            )
        )

    return Snapshot(
        taken_at=taken_at,
        server=server,
        thresholds=thresholds,
        total=total,
        hidden=hidden,
        waiting_on_lock=sum(g.waiting_on_lock for g in groups),
        by_state=by_state,
        groups=tuple(groups),
        level=level,
        alerts=tuple(alerts),
    )


async def fetch(
    con: asyncpg.Connection[Any],
    thresholds: Thresholds | None = None,
    *,
    show_queries: bool = False,
    query_width: int = 80,
) -> Snapshot:
    """Two round trips: the server's settings, then its client backends."""
    info = await con.fetchrow(_SERVER_SQL)
    assert info is not None
    # query_width is an int from argparse; it is formatted, never user text.
    query_column = _QUERY_COLUMN.format(limit=_fetched(query_width)) if show_queries else "NULL::text"
    rows = await con.fetch(_ACTIVITY_SQL.format(query_column=query_column))
    host, port = info["host"], info["port"]
    server = ServerInfo(
        version=info["version"],
        user=info["user_name"],
        database=info["database"],
        address=f"{host}:{port}" if host is not None else "local socket",
        max_connections=info["max_connections"],
        superuser_reserved_connections=info["superuser_reserved"],
        reserved_connections=info["reserved"],
    )
    sessions = [
        Session(
            application_name=row["application_name"],
            state=row["state"],
            waiting_on_lock=row["waiting_on_lock"],
            state_age=_age(row["state_age"]),
            transaction_age=_age(row["transaction_age"]),
            query_age=_age(row["query_age"]),
            query=row["query"],
        )
        for row in rows
    ]
    return aggregate(sessions, server, info["taken_at"], thresholds, query_width)
