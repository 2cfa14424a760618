"""``reset_mode="auto"``: reset a session on release only when the lease's SQL
could have changed session state.

Two parts:

* :func:`reset_reason` classifies a statement string with PostgreSQL's own
  parser (the ``pglast`` package, the ``safepool[auto]`` extra). A string is
  *neutral* (``None``) only if every statement in it is provably neutral;
  anything else, including text that does not parse, returns a short reason.
  Results are cached per statement text, so the hot path is a dict lookup.
* :class:`AutoResetProxy`, the connection handed to application code in auto
  mode. Every ``Connection`` method that takes SQL classifies it before
  forwarding; every other method is either on an explicit allowlist of
  methods that cannot change the server session, or marks the lease for a
  full reset (``holder.clean_mark = -1``). A method that a future asyncpg adds
  marks by default, and so does any other attribute (the base proxy's
  ``__getattr__``: a private one, or a connection_class's helper), and every
  lease of a connection whose class overrides asyncpg's methods.

What the classifier cannot see (triggers, rules, views, column defaults, row
security policies, domain checks and casts that call user functions, user
functions called in attribute notation, user overloads of built-in names) is
listed in docs/reset-modes.md.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import weakref
from typing import TYPE_CHECKING, Any, Final

from asyncpg import connection as _pg_connection
from asyncpg.protocol import protocol as _pg_protocol

from .proxy import (
    COUNTED,
    OWN_METHODS,
    PARSE_WITHOUT_SYNC,
    PoolConnectionProxy,
    _mark_coroutine,
    _released_error,
    counted_cursor,
    marking_forwarder,
    named_for,
    plain_forwarder,
    watch,
)

if TYPE_CHECKING:
    from ._holder import Holder as _Holder
    from ._internals import RawConnection
    from ._state import Lease

__all__ = [
    "CACHE_SIZE",
    "MAX_CACHED_LENGTH",
    "AutoResetProxy",
    "require_parser",
    "reset_reason",
]

#: Statement texts remembered by the classifier (oldest forgotten first).
CACHE_SIZE: Final = 4096
#: Longer statement texts are not parsed (nor cached): they count as needing
#: a reset, which costs one round trip on release, less than parsing them.
MAX_CACHED_LENGTH: Final = 16384

_INSTALL_HINT = "reset_mode='auto' needs the pglast package: pip install 'safepool[auto]'"

# ``getattr(settings, name)`` for a server parameter (a ParameterStatus value)
# of asyncpg's ConnectionSettings, at a quarter of the cost: a parameter is
# not a real attribute, so getattr first fails the normal lookup (an
# AttributeError raised and caught in C) before the class's __getattr__ finds
# it (~400 ns against ~120 ns, asyncpg 0.29-0.32). Plain getattr if a later
# asyncpg drops the method.
_read_setting: Any = getattr(getattr(_pg_protocol, "ConnectionSettings", None), "__getattr__", getattr)

_MISS: Final[Any] = object()
_cache: dict[Any, str | None] = {}
_cache_get = _cache.get
_parse_json: Any = None


def require_parser() -> None:
    """Import pglast now (the pool calls this when ``reset_mode="auto"``).

    :raises ImportError: pglast is not installed; the message names
        ``pip install 'safepool[auto]'``.
    """
    global _parse_json
    if _parse_json is not None:
        return
    try:
        parser = importlib.import_module("pglast.parser")
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    _parse_json = parser.parse_sql_json


def reset_reason(sql: object) -> str | None:
    """Why ``sql`` (one or more statements) may change session state, or
    None when every statement in it is provably neutral.

    Cached per text (:data:`CACHE_SIZE` entries; texts longer than
    :data:`MAX_CACHED_LENGTH` characters are not parsed and need a reset).

    :raises ImportError: pglast is not installed.
    """
    try:
        reason = _cache_get(sql, _MISS)
    except TypeError:  # unhashable: not a statement string
        return "the query is not a string"
    if reason is _MISS:
        return _classify_and_remember(sql)
    return reason  # type: ignore[no-any-return]


def cache_clear() -> None:
    """Forget every cached classification (tests)."""
    _cache.clear()


def cache_len() -> int:
    """Statement texts cached now."""
    return len(_cache)


def _classify_and_remember(sql: object) -> str | None:
    if not isinstance(sql, str):
        return "the query is not a string"
    if len(sql) > MAX_CACHED_LENGTH:
        return f"statement text longer than {MAX_CACHED_LENGTH} characters (not parsed)"
    reason = _classify(sql)
    if len(_cache) >= CACHE_SIZE:
        try:
            del _cache[next(iter(_cache))]
        except (KeyError, RuntimeError, StopIteration):  # another thread got there first
            pass
    _cache[sql] = reason
    return reason


# ------------------------------------------------------------- the classifier

# Built-in functions (all in pg_catalog) that cannot change session state.
# Sequence functions are here on purpose: nextval() changes currval()/lastval(),
# which asyncpg's reset query (and so a full reset) does not clear either.
# Deliberately absent: set_config (handled below), the session-level advisory
# lock functions, setseed, dblink*, lo_*, pg_replication_origin_session_*,
# replication slot functions, pg_stat_reset*, anything that reads or writes
# server files, and every function not named here.
_NEUTRAL_FUNCTIONS: Final = frozenset(
    """
    abs ceil ceiling floor round trunc sign sqrt cbrt power pow exp ln log log10 mod div pi degrees radians
    sin cos tan asin acos atan atan2 width_bucket gcd lcm factorial scale min_scale trim_scale random
    random_normal
    lower upper initcap length char_length character_length octet_length bit_length concat concat_ws
    substr substring left right lpad rpad ltrim rtrim btrim replace translate reverse repeat split_part
    strpos position starts_with regexp_replace regexp_match regexp_matches regexp_split_to_array
    regexp_split_to_table regexp_like regexp_count regexp_instr regexp_substr format md5 sha224 sha256
    sha384 sha512 encode decode to_hex ascii chr quote_ident quote_literal quote_nullable string_to_array
    array_to_string string_to_table overlay normalize unistr convert_from convert_to parse_ident
    now clock_timestamp statement_timestamp transaction_timestamp timeofday date_trunc date_part extract
    date_bin age make_date make_time make_timestamp make_timestamptz make_interval to_timestamp to_date
    to_char to_number justify_days justify_hours justify_interval isfinite timezone date_add date_subtract
    count sum avg min max array_agg string_agg json_agg jsonb_agg json_object_agg jsonb_object_agg
    json_agg_strict jsonb_agg_strict bool_and bool_or every bit_and bit_or bit_xor stddev stddev_pop
    stddev_samp variance var_pop var_samp corr covar_pop covar_samp percentile_cont percentile_disc mode
    any_value range_agg xmlagg
    row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value last_value nth_value
    to_json to_jsonb json_build_object jsonb_build_object json_build_array jsonb_build_array json_object
    jsonb_object array_to_json row_to_json json_array_length jsonb_array_length json_each jsonb_each
    json_each_text jsonb_each_text json_extract_path jsonb_extract_path json_extract_path_text
    jsonb_extract_path_text json_object_keys jsonb_object_keys json_array_elements jsonb_array_elements
    json_array_elements_text jsonb_array_elements_text json_typeof jsonb_typeof jsonb_set jsonb_set_lax
    jsonb_insert jsonb_strip_nulls json_strip_nulls jsonb_pretty jsonb_path_query jsonb_path_query_array
    jsonb_path_query_first jsonb_path_exists jsonb_path_match json_populate_record jsonb_populate_record
    json_populate_recordset jsonb_populate_recordset json_to_record jsonb_to_record json_to_recordset
    jsonb_to_recordset
    array_length array_upper array_lower array_dims array_ndims cardinality array_append array_prepend
    array_cat array_remove array_replace array_position array_positions array_fill unnest trim_array
    generate_series generate_subscripts
    pg_sleep pg_sleep_for pg_sleep_until gen_random_uuid uuidv4 uuidv7 version current_database
    current_schema current_schemas current_setting pg_backend_pid pg_postmaster_start_time
    inet_server_addr inet_server_port inet_client_addr inet_client_port txid_current
    txid_current_if_assigned pg_current_xact_id pg_current_xact_id_if_assigned pg_notify pg_typeof
    format_type pg_column_size pg_table_size pg_relation_size pg_total_relation_size pg_database_size
    pg_size_pretty pg_size_bytes to_regclass to_regtype to_regproc has_table_privilege
    has_schema_privilege has_database_privilege has_column_privilege has_function_privilege pg_has_role
    pg_get_indexdef pg_get_constraintdef pg_get_expr pg_get_userbyid obj_description col_description
    pg_my_temp_schema pg_is_other_temp_schema pg_listening_channels pg_is_in_recovery
    pg_advisory_xact_lock pg_advisory_xact_lock_shared pg_try_advisory_xact_lock
    pg_try_advisory_xact_lock_shared
    nextval currval lastval setval
    int4range int8range numrange tsrange tstzrange daterange isempty lower_inc upper_inc lower_inf
    upper_inf range_merge
    to_tsvector to_tsquery plainto_tsquery phraseto_tsquery websearch_to_tsquery ts_rank ts_rank_cd
    ts_headline setweight
    num_nulls num_nonnulls pg_input_is_valid
    similar_to_escape like_escape pg_collation_for is_normalized system_user
    """.split()
)

# Attribute notation calls a function without a FuncCall node: PostgreSQL
# reads `(42).pg_advisory_lock` as pg_advisory_lock(42), and `t.f` (no
# column f) as f(t). So a field name (the last of a qualified column
# reference, or a `(expr).name` selection) that may name a volatile built-in
# callable with one argument needs a reset. On PostgreSQL 18 every such
# function off the allowlist starts with one of these prefixes or is named
# below (a server test checks the catalog); the prefixes also cover later
# pg_* and lo_* functions, and dblink's; and the two setters of a session
# setting among the contrib modules' one-argument volatile functions off
# those prefixes (all 43 modules of PostgreSQL 18, review h239): pg_trgm's
# set_limit and isn's isn_weak. A user function called this way reads as a
# column: docs/reset-modes.md lists it with the blind spots.
_FIELD_CALL_PREFIXES: Final = ("pg_", "lo_", "binary_upgrade_", "dblink")
_FIELD_CALL_NAMES: Final = frozenset(
    """
    amvalidate array_shuffle brin_summarize_new_values gin_clean_pending_list plpgsql_validator setseed
    ts_stat txid_status set_limit isn_weak
    """.split()
)

# Settings whose transaction-local change would make the classifier misread
# later statements of the same transaction (how strings and names are read).
_UNSAFE_LOCAL_SETTINGS: Final = frozenset({"search_path", "standard_conforming_strings", "client_encoding"})

# Operator names that exist in pg_catalog (PostgreSQL 18). `!=` parses as `<>`.
_BUILTIN_OPERATORS: Final = frozenset(
    """
    !! !~ !~* !~~ !~~* # ## #- #> #>> % & && &< &<| &> * *< *<= *<> *= *> *>= + - -> ->> -|- / < <-> <<
    <<= <<| <= <> <@ <^ = > >= >> >>= >^ ? ?# ?& ?- ?-| ?| ?|| @ @-@ @> @? @@ @@@ ^ ^@ | |&> |/ |>> || ||/
    ~ ~* ~<=~ ~<~ ~= ~>=~ ~>~ ~~ ~~*
    """.split()
)
_KEYWORD_OPERATOR_KINDS: Final = frozenset(
    {"AEXPR_BETWEEN", "AEXPR_NOT_BETWEEN", "AEXPR_BETWEEN_SYM", "AEXPR_NOT_BETWEEN_SYM"}
)

# Node types allowed anywhere inside a neutral statement (everything else:
# reset). Typed fields (a RangeVar relation, a TypeName) appear unwrapped in
# the parser's JSON and need no entry.
_NEUTRAL_NODES: Final = frozenset(
    """
    SelectStmt InsertStmt UpdateStmt DeleteStmt MergeStmt MergeWhenClause ReturningClause ReturningOption
    ResTarget ColumnRef A_Const String Integer Float Boolean BitString A_Star ParamRef A_Expr BoolExpr
    NullTest BooleanTest FuncCall NamedArgExpr TypeCast TypeName CollateClause SubLink CaseExpr CaseWhen
    CoalesceExpr MinMaxExpr RowExpr A_ArrayExpr A_Indirection A_Indices SQLValueFunction GroupingFunc
    GroupingSet WindowDef SortBy RangeVar RangeSubselect RangeFunction RangeTableSample JoinExpr Alias
    WithClause CommonTableExpr CTESearchClause CTECycleClause LockingClause OnConflictClause InferClause
    IndexElem MultiAssignRef SetToDefault CurrentOfExpr DefElem List XmlExpr XmlSerialize ColumnDef
    JsonObjectConstructor JsonArrayConstructor JsonArrayQueryConstructor JsonValueExpr JsonOutput
    JsonReturning JsonFormat JsonKeyValue JsonIsPredicate JsonObjectAgg JsonArrayAgg JsonAggConstructor
    JsonFuncExpr JsonTable JsonTableColumn JsonTablePathSpec JsonParseExpr JsonScalarExpr JsonSerializeExpr
    JsonArgument JsonBehavior MergeSupportFunc
    """.split()
)

_DML: Final = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
_SESSION_TRANSACTION_KINDS: Final = frozenset(
    {"TRANS_STMT_PREPARE", "TRANS_STMT_COMMIT_PREPARED", "TRANS_STMT_ROLLBACK_PREPARED"}
)


def _classify(sql: str) -> str | None:
    if _parse_json is None:
        require_parser()
    try:
        tree = json.loads(_parse_json(sql))
    except Exception as exc:  # pglast.parser.ParseError, or anything unexpected
        return f"does not parse: {exc}"
    for raw in tree.get("stmts", ()):
        reason = _statement_reason(raw.get("stmt", {}))
        if reason is not None:
            return reason
    return None


def _node(wrapped: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    ((kind, body),) = wrapped.items()
    return kind, body


def _statement_reason(wrapped: dict[str, Any]) -> str | None:
    kind, body = _node(wrapped)
    if kind in _DML:
        return _walk(body)
    if kind == "TransactionStmt":
        if body.get("kind") in _SESSION_TRANSACTION_KINDS:
            return "two-phase commit statement"
        return None
    if kind == "VariableSetStmt":
        return _set_reason(body)
    if kind in ("VariableShowStmt", "ConstraintsSetStmt", "LockStmt", "NotifyStmt"):
        return None
    if kind == "ExplainStmt":
        return _statement_reason(body["query"])
    if kind == "CopyStmt":
        if body.get("filename") is not None or body.get("is_program"):
            return "COPY to or from a server file or program"
        return _walk(body)
    return f"{kind} may change session state"


def _set_reason(body: dict[str, Any]) -> str | None:
    setkind = body.get("kind")
    name = str(body.get("name", "")).lower()
    if setkind == "VAR_SET_MULTI":
        # SET TRANSACTION ... / SET TRANSACTION SNAPSHOT: this transaction only.
        # SET SESSION CHARACTERISTICS AS TRANSACTION: the session's default.
        if name.startswith("transaction"):
            return None
        return f"SET {name.upper()} changes the session"
    if setkind in ("VAR_RESET", "VAR_RESET_ALL"):
        return "RESET changes the session"
    if not body.get("is_local"):
        return f"SET {name} (not LOCAL) changes the session"
    if name in _UNSAFE_LOCAL_SETTINGS:
        return f"SET LOCAL {name} changes how later statements are read"
    return None


def _walk(node: Any) -> str | None:
    """Reason found anywhere under ``node`` (the parser's JSON), or None."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not isinstance(item, dict):
            continue
        for key, value in item.items():
            if key[:1].isupper():
                if key not in _NEUTRAL_NODES:
                    return f"{key} may change session state"
                if key == "FuncCall":
                    reason = _call_reason(value)
                    if reason is not None:
                        return reason
                elif key == "A_Expr":
                    reason = _operator_reason(value)
                    if reason is not None:
                        return reason
                elif key == "SubLink" or key == "SortBy":
                    # The operator of `x op ANY/ALL (SELECT ...)` and `x IN
                    # (SELECT ...)` (operName), and of ORDER BY x USING op
                    # (useOp; also in an aggregate's or a window's ORDER BY,
                    # where the sort calls the comparison function of op's
                    # btree operator family): operators too, not A_Expr.
                    op = value.get("operName" if key == "SubLink" else "useOp")
                    if op:
                        reason = _operator_name_reason(_names(op))
                        if reason is not None:
                            return reason
                elif key == "RangeTableSample":
                    method = _names(value.get("method", ()))
                    if method not in (["bernoulli"], ["system"], ["pg_catalog", "bernoulli"], ["pg_catalog", "system"]):
                        return f"TABLESAMPLE method {'.'.join(method)}"
                elif key == "ColumnRef":
                    fields = value.get("fields", ())
                    if len(fields) > 1:
                        reason = _field_reason(fields[-1])
                        if reason is not None:
                            return reason
                elif key == "A_Indirection":
                    for item in value.get("indirection", ()):
                        reason = _field_reason(item)
                        if reason is not None:
                            return reason
            elif key == "intoClause":
                # Also on the leftmost SELECT of a UNION/INTERSECT/EXCEPT
                # (larg, a SelectStmt without its node name), where the
                # server takes it for the whole statement's INTO.
                if value is not None:
                    return "SELECT INTO creates a table"
            elif key == "relation":
                # The target of INSERT/UPDATE/DELETE/MERGE/COPY (a FROM
                # item is a named RangeVar node). pg_settings has a rule:
                # UPDATE pg_settings SET setting = ... runs
                # set_config(name, setting, false).
                if isinstance(value, dict) and value.get("relname") == "pg_settings":
                    return "UPDATE pg_settings runs set_config(..., false) (a rule)"
            if isinstance(value, (dict, list)):
                stack.append(value)
    return None


def _field_reason(item: Any) -> str | None:
    name = item.get("String", {}).get("sval") if isinstance(item, dict) else None
    if name is None or name in _NEUTRAL_FUNCTIONS:
        return None
    if name.startswith(_FIELD_CALL_PREFIXES) or name in _FIELD_CALL_NAMES:
        return f"field .{name} may call {name}() (attribute notation)"
    return None


def _names(items: Any) -> list[str]:
    return [item.get("String", {}).get("sval", "?") for item in items]


def _builtin_name(names: list[str]) -> str | None:
    """The unqualified name when ``names`` is unqualified or pg_catalog's."""
    if len(names) == 1:
        return names[0]
    if len(names) == 2 and names[0] == "pg_catalog":
        return names[1]
    return None


def _call_reason(call: dict[str, Any]) -> str | None:
    names = _names(call.get("funcname", ()))
    name = _builtin_name(names)
    if name == "set_config":
        return _set_config_reason(call.get("args", []))
    if name is None or name not in _NEUTRAL_FUNCTIONS:
        return f"function {'.'.join(names)}() is not known to be neutral"
    return None


def _set_config_reason(args: list[Any]) -> str | None:
    # Neutral only as set_config('<safe literal name>', value, true).
    if len(args) != 3:
        return "set_config() without three positional arguments"
    setting = args[0].get("A_Const", {}).get("sval", {}).get("sval")
    if not isinstance(setting, str):
        return "set_config() with a computed setting name"
    if setting.lower() in _UNSAFE_LOCAL_SETTINGS:
        return f"set_config('{setting}', ..., true) changes how later statements are read"
    if args[2].get("A_Const", {}).get("boolval", {}).get("boolval") is not True:
        return "set_config() whose is_local is not the literal true"
    return None


def _operator_reason(expr: dict[str, Any]) -> str | None:
    if expr.get("kind") in _KEYWORD_OPERATOR_KINDS:
        return None
    return _operator_name_reason(_names(expr.get("name", ())))


def _operator_name_reason(names: list[str]) -> str | None:
    name = _builtin_name(names)
    if name is None or name not in _BUILTIN_OPERATORS:
        return f"operator {'.'.join(names)} is not built in"
    return None


# ------------------------------------------------------------------ the proxy

# Connection methods whose SQL is classified: method -> name of the SQL
# argument (always the first positional one).
SQL_METHODS: Final = {
    "execute": "query",
    "executemany": "command",
    "fetch": "query",
    "fetchrow": "query",
    "fetchval": "query",
    "fetchmany": "query",
    "prepare": "query",
    "cursor": "query",
}
# COPY methods: asyncpg builds the statement; the user's SQL is a query or a
# WHERE expression, classified inside the COPY statement asyncpg would send,
# and the options must not change how that statement reads (see
# _copy_options_reason). copy_from_table has no SQL of its own, only options.
COPY_METHODS: Final = frozenset({"copy_from_query", "copy_to_table", "copy_records_to_table", "copy_from_table"})
# Methods that cannot change the server session. transaction() sends only
# BEGIN [ISOLATION LEVEL ...] / COMMIT / ROLLBACK / SAVEPOINT; the listener
# and logger methods are client-side (add_listener is not: it sends LISTEN).
NEUTRAL_METHODS: Final = frozenset(
    {
        "transaction",
        "is_closed",
        "is_in_transaction",
        "get_server_pid",
        "get_server_version",
        "get_settings",
        "get_reset_query",
        "add_log_listener",
        "remove_log_listener",
        "add_termination_listener",
        "remove_termination_listener",
        "add_query_logger",
        "remove_query_logger",
        "query_logger",
    }
)
# Every other public method marks the lease for a full reset: add_listener and
# remove_listener (LISTEN/UNLISTEN), reset, reload_schema_state, the type
# codec methods (client-side, and a full reset does not undo them either, but
# they introspect), close, terminate, and whatever a later asyncpg adds.


def method_policy(name: str) -> str:
    """How :class:`AutoResetProxy` treats ``Connection.<name>``: ``"sql"``,
    ``"copy"``, ``"neutral"`` or ``"marks"``."""
    if name in SQL_METHODS:
        return "sql"
    if name in COPY_METHODS:
        return "copy"
    if name in NEUTRAL_METHODS:
        return "neutral"
    return "marks"


class AutoResetProxy(PoolConnectionProxy):
    """The proxy of ``reset_mode="auto"``: marks its lease for a full reset
    (``holder.clean_mark = -1``) when the SQL it forwards, or a method it
    forwards, may change the session. After release every call raises
    ``InterfaceError`` (``LeaseExpiredError`` after a lease timeout), as with
    the base proxy."""

    __slots__ = ()

    def __init__(self, holder: _Holder, con: RawConnection, lease: Lease) -> None:
        # PoolConnectionProxy.__init__, inlined (one lease each: the super()
        # call was a third of this proxy's cost over the base one).
        self._raw = con
        self._holder = holder
        self._lease = lease
        self._expired = None
        con._proxy = weakref.proxy(self, holder.proxy_collected)
        # The parser reads strings as standard_conforming_strings=on does;
        # a session where it is off (a server, database or role setting)
        # could hide a statement inside what the parser takes for a string.
        # A server that never reported it (PostgreSQL and PgBouncer do) is
        # treated as off: this runs after the lease was granted, and an
        # error here would lose the lease.
        try:
            standard_strings = _read_setting(con.get_settings(), "standard_conforming_strings")
        except AttributeError:
            standard_strings = None
        # So is a connection whose class has asyncpg's methods of its own (or
        # a patch of asyncpg's Connection: _pg.overrides), read once per
        # connection (Holder.own_methods).
        if standard_strings != "on" or holder.own_methods:
            holder.clean_mark = -1


def _sql_forwarder(name: str, argname: str, is_coroutine: bool) -> Any:
    # prepare() and cursor() may leave the backend in the implicit
    # transaction of their Parse (proxy.PARSE_WITHOUT_SYNC): whatever the
    # SQL, a round trip must end it. A statement that raised may have
    # stopped there too (proxy.watch).
    always = name in PARSE_WITHOUT_SYNC
    # prepare(): counted while it runs, as the base proxy counts it (proxy.COUNTED).
    counted = name in COUNTED and is_coroutine
    # The wrappers, named as asyncpg's method (proxy.named_for).
    copying, marking, watched = (named_for(wrapper, name) for wrapper in (_copying_watched, _marking, watch))

    def call(self: AutoResetProxy, *args: Any, **kwargs: Any) -> Any:
        con = self._raw
        if con is None:
            raise _released_error(self, name)
        sql = args[0] if args else kwargs.get(argname)
        try:
            reason = _cache_get(sql, _MISS)
        except TypeError:
            reason = "not a string"
        if always or (reason is not None and (reason is not _MISS or _classify_and_remember(sql) is not None)):
            self._holder.clean_mark = -1
            if counted:
                return copying(self, name, args, kwargs)
            if is_coroutine:
                return marking(self, name, args, kwargs)
            if name == "cursor":
                return counted_cursor(con.__class__.cursor(con, *args, **kwargs))
            return getattr(con.__class__, name)(con, *args, **kwargs)
        if is_coroutine:
            return watched(self, name, args, kwargs)
        return getattr(con.__class__, name)(con, *args, **kwargs)

    return call


async def _marking(proxy: AutoResetProxy, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Await ``Connection.<name>(*args, **kwargs)``, a call that may change
    the session, its lease marked by the call (``clean_mark = -1``, the
    holder's until the release's reset). The method is called here, at the
    first step (see proxy.watch).

    :raises asyncpg.InterfaceError: the lease had ended before this first
        ran (a missing ``await``): until review h227 the call ran on the
        connection after its lease's release, marking the lease it ran in;
        a late ``add_listener()`` or ``close()`` acted on a connection idle
        or another lease's (review h230)."""
    con = proxy._raw
    if con is None:
        raise _released_error(proxy, name)
    del proxy  # (see proxy.watch)
    return await getattr(con.__class__, name)(con, *args, **kwargs)


def _marking_forwarder(name: str) -> Any:
    """A coroutine method that may change the session and sends no SQL of
    the caller's (``add_listener()``, ``set_type_codec()``, ``close()``...):
    marks the lease at the call, runs in :func:`_marking`."""
    marking = named_for(_marking, name)

    def call(self: AutoResetProxy, *args: Any, **kwargs: Any) -> Any:
        if self._raw is None:
            raise _released_error(self, name)
        self._holder.clean_mark = -1
        return marking(self, name, args, kwargs)

    return call


def _copy_statement(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The part of the COPY statement asyncpg builds that holds user SQL."""
    if name == "copy_from_query":
        query = args[0] if args else kwargs.get("query")
        return f"COPY ({query}) TO STDOUT"
    where = kwargs.get("where")
    if not where:
        return None  # COPY <quoted table> FROM STDIN / TO STDOUT
    return f"COPY _ FROM STDIN WHERE {where}"


# COPY options asyncpg pastes into the statement as str(value), unquoted
# (booleans expected, or HEADER MATCH); the others it quotes.
_RAW_COPY_OPTIONS: Final = ("oids", "freeze", "header")
_QUOTED_COPY_OPTIONS: Final = ("format", "delimiter", "null", "quote", "escape", "force_quote", "encoding")


def _copy_options_reason(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Why asyncpg's COPY statement may not be the one classified."""
    if name == "copy_from_query" and len(args) > 1:
        # asyncpg inlines the arguments (utils._mogrify): it replaces every
        # $n of the text, inside string literals and comments too, with a
        # quoted literal, so the server runs a text that was not classified.
        # (Those two extra round trips dwarf the reset's.)
        return "copy_from_query() with arguments (asyncpg inlines them into the text)"
    for option in _RAW_COPY_OPTIONS:
        value = kwargs.get(option)
        if value is not None and not (isinstance(value, (bool, int, str)) and str(value).isalnum()):
            return f"COPY option {option}={value!r} is pasted into the statement unquoted"
    if name == "copy_from_query":
        # The options follow the query: after a query whose last line is a
        # -- comment, a line break inside a quoted option value ends that
        # comment, and the rest of the value is read as SQL.
        for option in _QUOTED_COPY_OPTIONS:
            value = kwargs.get(option)
            items = [value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else ()
            if any(isinstance(item, str) and ("\n" in item or "\r" in item) for item in items):
                return f"COPY option {option} holds a line break"
    return None


def _copy_forwarder(name: str) -> Any:
    # As the base proxy's copy_forwarder, the call is counted on the holder
    # while it goes on (proxy._copying: a take-back waits for it, else a COPY
    # still opening its file ran in the next lease's session), and, as the
    # SQL methods', watched (proxy.watch): one that raised is marked
    # (copy_records_to_table prepares its introspection query before the COPY).
    copying = named_for(_copying_watched, name)  # (named as asyncpg's method: proxy.named_for)

    def call(self: AutoResetProxy, *args: Any, **kwargs: Any) -> Any:
        con = self._raw
        if con is None:
            raise _released_error(self, name)
        holder = self._holder
        statement = _copy_statement(name, args, kwargs)
        marked = (statement is not None and reset_reason(statement) is not None) or _copy_options_reason(
            name, args, kwargs
        ) is not None
        if marked:
            holder.clean_mark = -1
        return copying(self, name, args, kwargs)

    return call


async def _copying_watched(proxy: AutoResetProxy, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """proxy._copying and proxy.watch in one coroutine (the call marked the
    lease if its SQL may change the session). A COPY counts no statement
    (``queries_count``): one counted here is asyncpg's own, the type
    introspection of ``copy_records_to_table`` (see proxy.watch).

    :raises asyncpg.InterfaceError: the lease had ended before this first
        ran (see proxy.watch)."""
    con = proxy._raw
    if con is None:
        raise _released_error(proxy, name)
    holder = proxy._holder
    del proxy  # (see proxy.watch)
    protocol = con._protocol
    before = protocol.queries_count
    holder.copies += 1
    try:
        result = await getattr(con.__class__, name)(con, *args, **kwargs)
    except BaseException:
        holder.clean_mark = -1
        raise
    finally:
        holder.copies -= 1
    if protocol.queries_count != before:
        holder.clean_mark = -1
    return result


def _install_forwarders() -> None:
    for name in dir(_pg_connection.Connection):
        if name.startswith("_") or name in AutoResetProxy.__dict__ or name in OWN_METHODS:
            continue  # (the base proxy's own methods are inherited: its terminate() notes a statement in flight)
        method = getattr(_pg_connection.Connection, name)
        if not inspect.isfunction(method):
            continue
        policy = method_policy(name)
        if policy == "sql":
            call = _sql_forwarder(name, SQL_METHODS[name], inspect.iscoroutinefunction(method))
        elif policy == "copy":
            call = _copy_forwarder(name)
        elif policy == "neutral":
            call = plain_forwarder(name)
        elif inspect.iscoroutinefunction(method):
            call = _marking_forwarder(name)
        else:
            call = marking_forwarder(name)
        if inspect.iscoroutinefunction(method):
            _mark_coroutine(call)
        setattr(AutoResetProxy, name, functools.update_wrapper(call, method))


_install_forwarders()
