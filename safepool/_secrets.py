"""A DSN's password kept out of error messages: shared by the pool (its
connect errors, which it raises, logs, emits and reports in health) and
``python -m safepool top``. A leaf module: no pool state."""

from __future__ import annotations

import ast
import functools
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, cast
from urllib.parse import quote, quote_plus, unquote, unquote_plus

# A URI's userinfo up to its password: "://user:" (not a port:
# "://host:5432/db?user=app@server" keeps its port and query).
_URI_USERINFO = re.compile(r"://[^:/@\s]*:(?!\d+(?:[/?#,]|$))")
_NON_BLANK_RUN = re.compile(r"\S+")


def _mask_uri_passwords(text: str) -> str:
    """``text`` with each URI's password (from its userinfo's ":" to the last
    "@" before a blank: an unescaped "@" in it) replaced by ``***``. Linear
    in ``text``'s length: a run of non-blanks is looked at once."""

    def masked(run: re.Match[str]) -> str:
        chunk = run.group(0)
        last_at = chunk.rfind("@")
        if last_at < 0:
            return chunk
        for userinfo in _URI_USERINFO.finditer(chunk):
            if userinfo.end() > last_at:
                break
            return chunk[: userinfo.end()] + "***" + chunk[last_at:]
        return chunk

    return _NON_BLANK_RUN.sub(masked, text) if "://" in text else text
# (Not one masked already: "got '...password=***'" keeps its closing quote,
# and "$$...password=***$$" its dollar quote's.)
_PASSWORD_PARAM = re.compile(r"(?i)(password=)(?!\*\*\*(?:[&\s'\",;)}$]|$))[^&\s]+")
# A password query parameter with the fields after it that have no "=": an
# unescaped "&" in the password ("password=pw&rest": asyncpg's query parser
# quotes the rest, "bad query field: 'rest'").
# (No whitespace stop: in a DSN a space is part of the value, and asyncpg
# keeps it: "?password=pw x&rest".)
_PASSWORD_PARAM_AND_REST = re.compile(r"(?i)password=[^&#]*(?:&[^&=#]*(?=[&#]|$))*")


# A PostgreSQL URI scheme written without its "//" ("postgresql:/user:pw@
# host/db", "postgres:user:pw@..."): asyncpg (urllib) then reads no
# authority, and the userinfo becomes the database's name, which a server's
# "database ... does not exist" quotes.
# Three or more slashes ("postgresql:///app:pw/db", no "@") read the same
# way: the database "app:pw/db".
_SCHEME_WITHOUT_AUTHORITY = re.compile(r"(?i)^(postgres(?:ql)?):(?:/|/{3,})?(?!/)")
# What urllib (asyncpg's URL parsing) strips from a URL's start: C0 controls
# and spaces (it also deletes tabs and newlines anywhere: _URL_UNSAFE).
_URL_LEADING = "".join(map(chr, range(0x21)))


def _uri(dsn: str) -> str:
    """``dsn`` as the URI its writer meant, if asyncpg reads it without an
    authority (a PostgreSQL scheme with no "//", or with three or more
    slashes; after a stray blank too): its pieces are then parsed as the
    password, host and database they were meant to be. Else ``dsn`` itself."""
    cleaned = dsn.translate(_URL_UNSAFE).lstrip(_URL_LEADING)
    match = _SCHEME_WITHOUT_AUTHORITY.match(cleaned)
    return dsn if match is None else match.group(1) + "://" + cleaned[match.end() :]


def _ats_in_query(rest: str) -> bool:
    """Whether every "@" of ``rest`` (a URI after its "://") stands in a
    value of a well-formed query ("db:5432/x?application_name=w@n1",
    Azure's "?user=app@server"), not in a userinfo."""
    question = rest.find("?")
    if question < 0 or rest.find("@") < question:
        return False
    query, _, fragment = rest[question + 1 :].partition("#")
    return (
        "@" not in fragment and _well_formed_query(query)
        and all("=" in field.partition("@")[0] for field in query.split("&") if "@" in field)
    )


def _port_suspects(hostport: str) -> list[str]:
    """What stands where ports go in ``host[:port][,host[:port]]`` and is
    not a port: with no "@" in a DSN ("postgresql://user:pw/db", the host
    left out), asyncpg reads the userinfo as host:port, and the password
    as a port ("invalid literal for int() with base 10: 'pw'")."""
    suspects = []
    for host in hostport.split(","):
        port = host.partition("]")[2] if host.startswith("[") else host
        port = port.partition(":")[2]
        if port and not port.isdigit():
            suspects.append(port)
    return suspects


def split(dsn: str) -> tuple[str, str, str] | None:
    """``(userinfo, host[:port], rest)`` of a URI DSN, parsed loosely, as
    written (see :func:`_uri` for what its writer meant)."""
    _, sep, rest = dsn.partition("://")
    if not sep:
        return None
    end = re.search(r"[/?#]", rest)
    authority = rest[: end.start()] if end else rest
    if "@" in authority or "@" not in rest or _ats_in_query(rest):
        userinfo, _, hostport = authority.rpartition("@")
        return userinfo, hostport, rest[len(authority) :]
    # A password holding "/", "?" or "#": the authority ends after the last "@".
    userinfo, _, after = rest.rpartition("@")
    end = re.search(r"[/?#]", after)
    return (userinfo, after[: end.start()], after[end.start() :]) if end else (userinfo, after, "")


def passwords(dsn: str) -> set[str]:
    """Every string that may be the DSN's password, raw and decoded. Parsing
    is deliberately loose: the password up to the first "@" (as asyncpg
    reads it), to the last one (an unescaped "@" in it), a query password
    with or without what follows an unescaped "&" or a space."""
    candidates = [match.group(0)[len("password=") :] for match in _PASSWORD_PARAM.finditer(dsn)]
    candidates += [match.group(0)[len("password=") :] for match in _PASSWORD_PARAM_AND_REST.finditer(dsn)]
    dsn = _uri(dsn)
    parts = split(dsn)
    if parts is not None:
        if not parts[0]:
            candidates += _port_suspects(parts[1])
        rest = dsn.partition("://")[2]
        first_userinfo = rest.partition("@")[0] if "@" in rest and not _ats_in_query(rest) else ""
        userinfos = (parts[0], first_userinfo, widest_userinfo(dsn))
        candidates += [userinfo.partition(":")[2] for userinfo in userinfos if ":" in userinfo]
    return {form for c in candidates if c for form in (c, unquote(c), unquote_plus(c)) if form}


def _well_formed_query(text: str) -> bool:
    """Whether ``text`` (after a "?") parses as asyncpg parses a query:
    every "&"-separated field has an "=" (up to a "#")."""
    return all("=" in field for field in text.partition("#")[0].split("&"))


def widest_userinfo(dsn: str) -> str:
    """The DSN's userinfo if its password holds every unescaped "@" the DSN
    has ("user:p@ss/word@host": asyncpg reads the password "p", the host
    "ss" and the database "word@host"), but not one in a well-formed query
    ("?options=a@b", "?password=p@ss": the query's own); "" without an
    "@". Query passwords are left out first (with what an unescaped "&"
    cut off them: "?password=p@ss&rest" is not a malformed query)."""
    dsn = _PASSWORD_PARAM_AND_REST.sub("password=", _uri(dsn))
    rest = dsn.partition("://")[2]
    end = len(rest)
    while True:
        at = rest.rfind("@", 0, end)
        if at < 0:
            parts = split(dsn)
            return parts[0] if parts is not None else ""
        question = rest.find("?")
        if 0 <= question < at and _well_formed_query(rest[question + 1 :]):
            field = rest[max(question, rest.rfind("&", question, at)) + 1 : at]
            if "=" in field:
                end = question  # the "@" is in a query value
                continue
        return rest[:at]


def without_password(dsn: str) -> str | None:
    """The DSN less every piece that may be its password (the userinfo's
    password to the last "@", query passwords with what an unescaped "&"
    cut off them); None when it is not a URI. What is left is not secret:
    a value found in it (the user, a host, a port) is not masked, or the
    mask would point at the password ("***@localhost" for a password equal
    to the user)."""
    dsn = _PASSWORD_PARAM_AND_REST.sub("", _uri(dsn))
    parts = split(dsn)
    if parts is None:
        return None
    scheme = dsn.partition("://")[0]
    userinfo, hostport, tail = parts
    if not userinfo:
        for suspect in _port_suspects(hostport):
            hostport = hostport.replace(":" + suspect, "", 1)
    user = userinfo.partition(":")[0]
    narrow = scheme + "://" + user + "@" + hostport + _PASSWORD_PARAM_AND_REST.sub("", tail)
    widest = widest_userinfo(dsn)
    if not widest or widest == userinfo:
        return narrow
    after = dsn.partition("://")[2][len(widest) + 1 :]
    return scheme + "://" + widest.partition(":")[0] + "@" + _PASSWORD_PARAM_AND_REST.sub("", after)


# The shortest password masked where it stands in free text: a shorter one
# is in too many words and numbers, and the masks would spell it out
# ("***uthentic***tion f***iled" for the password "a").
_MIN_MASKED = 4
# A password of letters alone shorter than this is left where it stands as
# a word of its own: there it is a word of the message more often than the
# password ("failed" in "Connect call failed", "password" in "password
# authentication failed"), and the mask would garble the message and point
# at the password. Inside a DSN, a ``password=`` field or quotes it is
# masked as any other.
_MIN_MASKED_WORD = 12


def _bare_maskable(secret: str) -> bool:
    """Whether ``secret`` is masked where it stands on its own in free text."""
    return len(secret) >= _MIN_MASKED and not (secret.isalpha() and len(secret) < _MIN_MASKED_WORD)


@functools.lru_cache(maxsize=64)
def _written_forms(secret: str) -> tuple[str, ...]:
    """``secret`` as text may hold it, longest first: as it is; as a str's
    ``repr()`` and ``ascii()`` write it (a backslash doubled, a quote or a
    control character escaped), also twice over (the repr of a message
    that holds a repr: an exception's repr); as a JSON string
    (``json.dumps``); %-encoded (``quote``, ``quote_plus``). An error that
    quotes the password with ``{settings!r}`` holds ``a\\\\b`` for the
    password ``a\\b``, one unescape from it (review h261)."""
    forms = {secret}
    for once in (repr(secret)[1:-1], ascii(secret)[1:-1]):
        forms.update((once, repr(once)[1:-1]))
    forms.update((json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]))
    forms.update((quote(secret, safe=""), quote_plus(secret, safe="")))
    return tuple(sorted(forms, key=len, reverse=True))


def _masked_in_text(text: str, secret: str) -> str:
    """``text`` with ``secret`` (in each of its written forms:
    :func:`_written_forms`) masked where it stands on its own: not inside a
    longer word or number ("1" in "127.0.0.1", "fail" in "failed")."""
    for form in _written_forms(secret):
        if form not in text:
            continue
        pattern = re.escape(form)
        if form[0].isalnum() or form[0] == "_":
            pattern = r"(?<!\w)" + pattern
        if form[-1].isalnum() or form[-1] == "_":
            pattern += r"(?!\w)"
        text = re.sub(pattern, "***", text)
    return text


def redact(text: str, dsn: str | None) -> str:
    """``text`` without the DSN's password, nor any password-looking URI
    part. The password's value is masked where it stands on its own in
    ``text``, unless it is short or is also a value the DSN shows without
    it (a user, a database, a port), or a word of letters alone (see
    ``_MIN_MASKED_WORD``): masking those would not hide the password but
    point at it."""
    if dsn:
        free = without_password(dsn)
        free_forms = _forms(free) if free is not None else set()
        for secret in sorted(passwords(dsn), key=len, reverse=True):
            if not _bare_maskable(secret) or any(secret in form for form in free_forms):
                continue
            text = _masked_in_text(text, secret)
    text = _mask_uri_passwords(text)
    return _PASSWORD_PARAM.sub(r"\1***", text)


# A password written as a string literal in Python source: a keyword or an
# assignment (password = "pw x"), a dict item ("password": 'pw', and
# kw["password"] = ...), a comparison (password == "..."), any name ending
# in password (db_password=...); prefixed (r"", b"", f"") or triple-quoted.
_SOURCE_PASSWORD = re.compile(
    r"(?i)(password['\"]?\]?\s*(?:==|=|:)\s*)[rbuf]{0,2}(\"\"\"|'''|\"|')(?:\\.|(?!\2).)*?\2"
)


def redact_traceback(text: str, dsn: object = None, password: object = None, shown: Sequence[object] = ()) -> str:
    """A formatted traceback as a log record shows it: password string
    literals in its source lines (``password="..."``, ``"password":
    "..."``) and the pool's password (as :func:`redact_known`) masked, in
    the messages too."""
    return redact_known(_SOURCE_PASSWORD.sub(r"\1***", text), dsn, password, shown)


def redact_source(line: str) -> str:
    """A line of Python source as a report may show it: without a DSN's
    password (a URI's, a ``password=`` field's) or a password string
    literal: :func:`redact_traceback` with no pool's password to add."""
    return redact_traceback(line)


# A Python string literal as ast.unparse writes one (and as source has it).
_PY_LITERAL = re.compile(r"[rbuf]{0,2}(\"\"\"|'''|\"|')(?:\\.|(?!\1).)*?\1", re.IGNORECASE | re.DOTALL)


def redact_code(text: str) -> str:
    """Text that quotes Python code (``check``'s findings): password string
    literals masked (``password="..."``), and DSN passwords inside string
    literals; code stays as written (``password=settings.db_password`` is
    a name, not a secret, and masking it would break the quoted code)."""
    text = _SOURCE_PASSWORD.sub(r"\1***", text)
    return _PY_LITERAL.sub(lambda literal: redact(literal.group(0), None), text)


def redact_known(text: str, dsn: object, password: object, shown: Sequence[object] = ()) -> str:
    """``text`` (a report's stack, whose lines are the application's source)
    without the pool's own password: its DSN's (as :func:`redact` masks it)
    and a ``password=`` connect argument's, where each stands on its own.
    Non-str arguments (no DSN, a password callable) add nothing. As
    :func:`redact` leaves a DSN's password that the DSN also shows (a user,
    a database), the argument is left where it is also one of ``shown``
    (the other connect arguments: ``user="orders", password="orders"``):
    masking it would point at it."""
    text = redact(text, dsn if isinstance(dsn, str) else None)
    if (
        isinstance(password, str) and _bare_maskable(password)
        and not any(isinstance(value, str) and password in value for value in shown)
    ):
        text = _masked_in_text(text, password)
    return text


# A query password to the next field that has an "=" (or the end): for a
# whole DSN shown masked, a "#" or a space in the password is its own.
_PASSWORD_VALUE_TO_NEXT_FIELD = re.compile(r"(?i)(password=).*?(?=&[^&=]*=|$)", re.DOTALL)


# A keyword DSN's password ("host=db password=pw dbname=x"), quoted or not.
_KEYWORD_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


def mask_dsn(dsn: str) -> str:
    """``dsn`` as it may be shown: its userinfo password (to the last "@")
    and query passwords replaced by ``***``; a keyword DSN's ``password=``
    value; and, in a DSN asyncpg misreads (:func:`_uri`), each piece that
    may be the password, the DSN otherwise shown as written."""
    uri = _uri(dsn)
    if "://" not in uri:
        return _KEYWORD_PASSWORD.sub(r"\1***", dsn)
    masked = _PASSWORD_VALUE_TO_NEXT_FIELD.sub(r"\1***", dsn)
    if uri is not dsn:
        for secret in sorted(passwords(dsn), key=len, reverse=True):
            masked = masked.replace(":" + secret, ":***")
        return masked
    parts = split(masked)
    if parts is not None and not parts[0]:
        for suspect in _port_suspects(parts[1]):
            masked = masked.replace(":" + suspect, ":***", 1)
    widest = widest_userinfo(masked)
    if ":" in widest:
        scheme, _, rest = masked.partition("://")
        masked = scheme + "://" + widest.partition(":")[0] + ":***@" + rest[len(widest) + 1 :]
    return masked


def redact_argv(text: str, argv: Sequence[str]) -> str:
    """An argparse error line without the passwords of the DSNs among the
    command line's arguments: each such argument, as argparse echoes it
    (plainly, or quoted with repr()), is replaced by :func:`mask_dsn`'s
    form; then :func:`redact` for what looks like a password."""
    # "--option=DSN": argparse echoes the value alone ("got 'DSN'").
    values = {a.partition("=")[2] for a in argv if a.startswith("-") and "=" in a}
    dsns = {a for a in (*argv, *values) if "://" in _uri(a) or "password=" in a.lower()}
    for arg in sorted(dsns, key=len, reverse=True):
        if not passwords(arg):
            continue
        masked = mask_dsn(arg)
        text = text.replace(repr(arg), repr(masked)).replace(arg, masked)
    return redact(text, None)


# A quoted piece of an error message: as repr() quotes it, in '...' or
# "..." with backslash escapes ('it\\'s', 'a\\\\b'); and plainly ('{}'
# formatting: a backslash is just a backslash).
_QUOTED = (
    # From a line's first quote to its last: a piece holding the other
    # quote kind, or its own unescaped (the server's 'database "a"b" does
    # not exist' for the database a"b).
    re.compile(r"'[^\n]*'|\"[^\n]*\""),
    re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\""),
    re.compile(r"'[^']*'|\"[^\"]*\""),
)
# What urllib's URL parsing (asyncpg's) deletes from a DSN.
_URL_UNSAFE = str.maketrans("", "", "\t\r\n")


def _forms(text: str) -> set[str]:
    """``text`` as asyncpg's parser may quote pieces of it: as given, with
    its %xx escapes decoded, without the characters urllib deletes."""
    forms = {text, unquote(text), unquote_plus(text)}
    return forms | {form.translate(_URL_UNSAFE) for form in forms}


def _unquoted(quoted: str) -> set[str]:
    """The text of a quoted piece: as written, and as the string whose
    repr() it is (repr() escapes backslashes, quotes and control chars)."""
    pieces = {quoted[1:-1]}
    if "\\" not in quoted:
        return pieces
    try:
        with warnings.catch_warnings():
            # (A plainly quoted backslash: "invalid escape sequence" warnings.)
            warnings.simplefilter("ignore")
            value = ast.literal_eval(quoted)
    except (ValueError, SyntaxError):
        return pieces
    if isinstance(value, str):
        pieces.add(value)
    return pieces


# What separates the values of a URI DSN.
_DSN_DELIMITERS = re.compile(r"[:/@?&=,#\[\]]+")


def scrub_quoted(detail: str, dsn: str | None) -> str:
    """asyncpg's DSN errors quote pieces of the DSN, and a misparsed DSN can
    put a piece of the password in them ("bad query field: 't@pw@host'").
    A quoted piece of the DSN that is not in the DSN without its password
    goes (the DSN's forms: as given, %xx-decoded, as urllib cleans it; the
    piece's: as written and as the string it is the repr() of)."""
    free = without_password(dsn) if dsn else None
    if dsn is None or free is None:
        return detail
    with_forms, without_forms = _forms(dsn), _forms(free)
    secrets = passwords(dsn)
    # The values the DSN shows without its password (a user, a host, a
    # port, a database, a query value): a piece of the password equal to
    # one is left (masking it would point at it); a piece that is only
    # part of one ("ternal" of the host "db.internal") is the password's.
    shown = {value for form in without_forms for value in _DSN_DELIMITERS.split(form) if value}

    def scrub(match: re.Match[str]) -> str:
        quoted = match.group(0)
        for piece in _unquoted(quoted):
            if not piece:
                continue
            if (
                any(piece in form for form in with_forms) and not any(piece in form for form in without_forms)
            ) or (len(piece) >= _MIN_MASKED and piece not in shown and any(piece in secret for secret in secrets)):
                return quoted[0] + "***" + quoted[-1]
        return quoted

    for quoted in _QUOTED:
        detail = quoted.sub(scrub, detail)
    return detail


def connect_secrets(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[object, object, list[object]]:
    """``(dsn, password, shown)`` of a connect's arguments, as
    :func:`redact_known` and :func:`scrub_connect_error` take them: the
    DSN, the ``password=`` argument and the other arguments' values."""
    shown = [value for key, value in kwargs.items() if key not in ("password", "dsn")]
    return connect_dsn(args, kwargs), kwargs.get("password"), shown


def connect_dsn(args: Sequence[Any], kwargs: Mapping[str, Any]) -> object:
    """The DSN among a connect's arguments, as ``asyncpg.connect(dsn=None,
    ...)`` takes it: the first positional one, else ``dsn=`` (None without)."""
    return args[0] if args else kwargs.get("dsn")


def scrub_connect_error(
    exc: BaseException, dsn: object, password: object = None, shown: Sequence[object] = (), *, quoted: bool = True
) -> None:
    """Take ``dsn``'s password, and a ``password=`` argument's, out of
    ``exc``'s message, in place (its type, traceback and cause stay), and
    out of the errors it chains to. For asyncpg's DSN errors: a password
    holding an unescaped "/", "?" or "#" is misparsed, and the error quotes
    a piece of it ("invalid literal for int() with base 10: 's3cret'"); for
    the server's, when such a DSN still logs in (trust authentication): the
    database asyncpg read is a piece of the password ('database "word@/db"
    does not exist', also in the error's ``message`` field); and for what
    the application's own code raises on the connect path (a ``connect=``
    callback, a ``connection_class``, an ``init=`` hook): a message that
    quotes the DSN ("cannot prepare {dsn}") or the password, masked as
    :func:`redact_known` masks them. ``quoted``: also the quoted pieces of
    a misparsed DSN (:func:`scrub_quoted`), which only a connect's own
    errors hold; not for a hook's error (an ``init=`` or ``setup=`` hook's
    statement failing: a short quoted value of the server's message, "b" in
    'invalid input syntax for type integer: "b"', is no piece of the DSN,
    even when the password holds that letter)."""
    if not isinstance(dsn, str) and not isinstance(password, str):
        return

    def clean(text: str) -> str:
        if quoted and isinstance(dsn, str):
            text = scrub_quoted(text, dsn)
        return redact_known(text, dsn, password, shown)

    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        error = pending.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        try:
            if any(isinstance(arg, str) for arg in error.args):
                error.args = tuple(clean(arg) if isinstance(arg, str) else arg for arg in error.args)
            fields = getattr(error, "__dict__", None)
            if fields:
                for name, value in list(fields.items()):
                    if isinstance(value, str):
                        fields[name] = clean(value)
                    elif name == "__notes__" and isinstance(value, list):
                        # (PEP 678's add_note(): the traceback prints them: review h231)
                        fields[name] = [clean(note) if isinstance(note, str) else note for note in value]
            if isinstance(error, OSError):
                # str() of OSError(errno, message, filename) reads these, not args.
                for name in ("strerror", "filename", "filename2"):
                    value = getattr(error, name, None)
                    if isinstance(value, str):
                        setattr(error, name, clean(value))
            if isinstance(error, BaseExceptionGroup) and isinstance(error.message, str):
                message = clean(error.message)
                if message != error.message:
                    _mask_group_message(error, message)
        except Exception:  # noqa: S110
            pass  # (an error class that refuses the write: raised as it is, never replaced by ours)
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)  # (a TaskGroup's: each sub-exception's message too)
        pending.extend(chained for chained in (error.__cause__, error.__context__) if chained is not None)


# The masked message of a group whose class _mask_group_message swapped.
_GROUP_MESSAGE = "_safepool_message"
_masked_group_classes: dict[type, type] = {}


def _group_message(group: BaseExceptionGroup[Any]) -> str:
    return cast(str, group.__dict__[_GROUP_MESSAGE])


def _group_str(group: BaseExceptionGroup[Any]) -> str:
    # BaseExceptionGroup.__str__ (CPython 3.11-3.13, Objects/exceptions.c), of the masked message.
    count = len(group.exceptions)
    return f"{_group_message(group)} ({count} sub-exception{'s' if count > 1 else ''})"


def _group_derive(group: BaseExceptionGroup[Any], excs: Sequence[BaseException]) -> BaseExceptionGroup[Any]:
    # BaseExceptionGroup.derive, of the masked message (except* and split() call it).
    return BaseExceptionGroup(_group_message(group), excs)


def _group_reduce(group: BaseExceptionGroup[Any]) -> tuple[Any, ...]:
    # BaseException.__reduce__, naming the class that was swapped (pickle
    # finds classes by name, and the masked one's is the original's).
    state = {name: value for name, value in group.__dict__.items() if name != _GROUP_MESSAGE}
    return (type(group).__mro__[1], group.args, state) if state else (type(group).__mro__[1], group.args)


def _mask_group_message(group: BaseExceptionGroup[Any], message: str) -> None:
    """Give ``group`` the message ``message``, in place. An exception
    group's message is read-only (``message``, which ``str()`` and the
    traceback read, is set once by ``BaseExceptionGroup.__new__``): the
    group's class becomes a subclass of it, with no state of its own, the
    same module and names (what a traceback prints), whose ``message``,
    ``__str__`` and ``derive`` (where the class keeps the built-in ones)
    give ``message``, and which pickles as the original class. Identity, ``isinstance()``, the sub-exceptions, the
    traceback and the chained errors stay (review h231).

    :raises TypeError: ``BaseExceptionGroup`` itself (a static type, whose
        instances keep their class): the caller leaves the group as it is."""
    cls = type(group)
    if cls not in _masked_group_classes.values():
        masked = _masked_group_classes.get(cls)
        if masked is None:
            namespace: dict[str, Any] = {
                "__slots__": (), "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                "__doc__": cls.__doc__, "message": property(_group_message),
            }
            if cls.__str__ is BaseExceptionGroup.__str__:
                namespace["__str__"] = _group_str
            if cls.derive is BaseExceptionGroup.derive:
                namespace["derive"] = _group_derive
            if cls.__reduce__ is BaseException.__reduce__:
                namespace["__reduce__"] = _group_reduce
            masked = _masked_group_classes[cls] = type(cls.__name__, (cls,), namespace)
        group.__class__ = masked
    group.__dict__[_GROUP_MESSAGE] = message
