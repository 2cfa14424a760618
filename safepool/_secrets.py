"""A DSN's password kept out of error messages: shared by the pool (its
connect errors, which it raises, logs, emits and reports in health) and
``python -m safepool top``. A leaf module: no pool state."""

from __future__ import annotations

import ast
import re
import warnings
from urllib.parse import unquote, unquote_plus

_URI_PASSWORD = re.compile(r"(://[^:/@\s]*:)\S*@")
_PASSWORD_PARAM = re.compile(r"(?i)(password=)[^&\s]+")
# A password query parameter with the fields after it that have no "=": an
# unescaped "&" in the password ("password=pw&rest": asyncpg's query parser
# quotes the rest, "bad query field: 'rest'").
_PASSWORD_PARAM_AND_REST = re.compile(r"(?i)password=[^&\s#]*(?:&[^&=\s#]*(?=[&#\s]|$))*")


def split(dsn: str) -> tuple[str, str, str] | None:
    """``(userinfo, host[:port], rest)`` of a URI DSN, parsed loosely."""
    _, sep, rest = dsn.partition("://")
    if not sep:
        return None
    end = re.search(r"[/?#]", rest)
    authority = rest[: end.start()] if end else rest
    if "@" in authority or "@" not in rest:
        userinfo, _, hostport = authority.rpartition("@")
        return userinfo, hostport, rest[len(authority) :]
    # A password holding "/", "?" or "#": the authority ends after the last "@".
    userinfo, _, after = rest.rpartition("@")
    end = re.search(r"[/?#]", after)
    return (userinfo, after[: end.start()], after[end.start() :]) if end else (userinfo, after, "")


def passwords(dsn: str) -> set[str]:
    """Every string that may be the DSN's password, raw and decoded. Parsing
    is deliberately loose: over-redacting an error message costs nothing."""
    candidates = [match.group(0)[len("password=") :] for match in _PASSWORD_PARAM.finditer(dsn)]
    parts = split(dsn)
    if parts is not None:
        rest = dsn.partition("://")[2]
        first_userinfo = rest.partition("@")[0] if "@" in rest else ""
        candidates += [userinfo.partition(":")[2] for userinfo in (parts[0], first_userinfo) if ":" in userinfo]
    return {form for c in candidates if c for form in (c, unquote(c), unquote_plus(c)) if form}


def redact(text: str, dsn: str | None) -> str:
    """``text`` without the DSN's password, nor any password-looking URI part."""
    if dsn:
        for secret in sorted(passwords(dsn), key=len, reverse=True):
            text = text.replace(secret, "***")
    text = _URI_PASSWORD.sub(r"\1***@", text)
    return _PASSWORD_PARAM.sub(r"\1***", text)


# A quoted piece of an error message: as repr() quotes it, in '...' or
# "..." with backslash escapes ('it\\'s', 'a\\\\b'); and plainly ('{}'
# formatting: a backslash is just a backslash).
_QUOTED = (
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


def scrub_quoted(detail: str, dsn: str | None) -> str:
    """asyncpg's DSN errors quote pieces of the DSN, and a misparsed DSN can
    put a piece of the password in them ("bad query field: 't@pw@host'").
    A quoted piece of the DSN that is not in the DSN without its password
    goes (the DSN's forms: as given, %xx-decoded, as urllib cleans it; the
    piece's: as written and as the string it is the repr() of)."""
    parts = split(dsn) if dsn else None
    if dsn is None or parts is None:
        return detail
    userinfo, hostport, tail = parts
    without_password = dsn.partition("://")[0] + "://" + userinfo.partition(":")[0] + "@" + hostport
    without_password += _PASSWORD_PARAM_AND_REST.sub("", tail)
    with_forms, without_forms = _forms(dsn), _forms(without_password)

    def scrub(match: re.Match[str]) -> str:
        quoted = match.group(0)
        for piece in _unquoted(quoted):
            if (
                piece
                and any(piece in form for form in with_forms)
                and not any(piece in form for form in without_forms)
            ):
                return quoted[0] + "***" + quoted[-1]
        return quoted

    for quoted in _QUOTED:
        detail = quoted.sub(scrub, detail)
    return detail


def scrub_connect_error(exc: BaseException, dsn: object) -> None:
    """Take pieces of ``dsn``'s password out of ``exc``'s message, in place
    (its type, traceback and cause stay). For asyncpg's DSN errors: a
    password holding an unescaped "/", "?" or "#" is misparsed, and the
    error quotes a piece of it ("invalid literal for int() with base 10:
    's3cret'")."""
    if isinstance(dsn, str) and any(isinstance(arg, str) for arg in exc.args):
        exc.args = tuple(scrub_quoted(arg, dsn) if isinstance(arg, str) else arg for arg in exc.args)
