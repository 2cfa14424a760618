"""Two views of a Snapshot: plain text (any terminal, logs, pipes) and a rich
renderable with colours for the live view. Both show the same facts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .snapshot import IDLE_IN_TRANSACTION, Group, Snapshot, format_age

if TYPE_CHECKING:
    from rich.console import RenderableType

# Two-line headers keep the table within 80 columns.
_COLUMNS = (
    ("", "APPLICATION"),
    ("", "STATE"),
    ("", "COUNT"),
    ("WAITING", "ON LOCK"),
    ("OLDEST", "IN STATE"),
    ("OLDEST", "XACT"),
    ("LONGEST", "QUERY"),
)


def _cells(group: Group) -> list[str]:
    return [
        group.application_name or "(none)",
        group.state or "(hidden)",
        str(group.count),
        str(group.waiting_on_lock) if group.waiting_on_lock else "-",
        format_age(group.oldest_state_age),
        format_age(group.oldest_transaction_age),
        format_age(group.longest_query),
    ]


def _label(group: Group) -> str:
    return f"{group.application_name or '(none)'} / {group.state or '(hidden)'}"


def header_lines(snapshot: Snapshot, interval: float | None = None) -> list[str]:
    server = snapshot.server
    taken = snapshot.taken_at.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    first = f"{server.user}@{server.database} on {server.address} · PostgreSQL {server.version} · {taken}"
    if interval is not None:
        first += f" · every {interval:g}s"
    second = f"connections {snapshot.total} / {server.available} ({snapshot.usage:.0%}) · {server.limits}"
    states = [f"{state} {count}" for state, count in snapshot.by_state]
    if snapshot.hidden:
        states.append(f"hidden {snapshot.hidden}")
    third = f"by state: {', '.join(states) or 'none'} · waiting on locks {snapshot.waiting_on_lock}"
    return [first, second, third]


def render_plain(snapshot: Snapshot, interval: float | None = None) -> str:
    """The snapshot as aligned text; leak-suspect rows and alerts marked ``!``."""
    headers = [[top for top, _ in _COLUMNS], [bottom for _, bottom in _COLUMNS]]
    rows = headers + [_cells(group) for group in snapshot.groups]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [*header_lines(snapshot, interval), ""]
    for index, row in enumerate(rows):
        group = snapshot.groups[index - len(headers)] if index >= len(headers) else None
        cells = [
            cell.ljust(width) if column < 2 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append(("! " if group is not None and group.alert else "  ") + "  ".join(cells).rstrip())
    queries = [group for group in snapshot.groups if group.query is not None]
    if queries:
        lines.extend(["", "queries (the oldest session of each group):"])
        lines.extend(f"  {_label(group)}: {_query_text(group.query)}" for group in queries)
    if snapshot.alerts:
        lines.append("")
        lines.extend(f"{'-' if a.level == 'note' else '!'} {a.level}: {a.message}" for a in snapshot.alerts)
    return "\n".join(lines) + "\n"


def _query_text(query: str | None) -> str:
    """A session that has run nothing since it connected shows an empty
    query in pg_stat_activity: say so rather than print nothing after the
    colon (--json keeps the empty string)."""
    return query or "(no query since it connected)"


_LEVEL_STYLE = {"ok": "green", "note": "dim", "warning": "bold yellow", "critical": "bold white on red"}


def render_rich(snapshot: Snapshot, interval: float | None = None, error: str | None = None) -> RenderableType:
    """A header, the table and the alerts, coloured by severity. ``error``: a
    line about the last refresh that failed (the snapshot is then the last good one)."""
    from rich import box
    from rich.console import Group as Stack
    from rich.table import Table
    from rich.text import Text

    first, second, third = header_lines(snapshot, interval)
    parts: list[RenderableType] = [
        Text(first, style="bold"),
        Text(second, style=_LEVEL_STYLE[snapshot.usage_level]),
        Text(third, style="bold magenta" if snapshot.waiting_on_lock else ""),
    ]
    if error is not None:
        parts.append(Text(error, style="bold red"))

    table = Table(header_style="bold", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for column, (top, bottom) in enumerate(_COLUMNS):
        # Only application names wrap: a state or an age cut short is misread.
        table.add_column(
            f"{top}\n{bottom}" if top else bottom, justify="left" if column < 2 else "right", no_wrap=column > 0
        )
    stacked: list[RenderableType] = []  # (the rows for a terminal narrower than the table: see _Fitted)
    for group in snapshot.groups:
        # Text, not str: rich reads a str as markup, and any client names
        # itself ("[/]" raised MarkupError, "[red]x[/red]" showed as "x").
        texts = _cells(group)
        cells: list[RenderableType] = [Text(text) for text in texts]
        if group.waiting_on_lock:
            cells[3] = Text(texts[3], style="bold magenta")
        if group.alert:
            # Marked as the plain view marks it: piped, or for a reader who
            # cannot tell red, the style alone is lost.
            cells[0] = Text("! " + texts[0])
            style = "bold red"
        elif group.state in IDLE_IN_TRANSACTION:
            style = "yellow"
        else:
            style = "dim" if group.state is None else ""
        table.add_row(*cells, style=style)
        label = _label(group) if group.count == 1 else f"{_label(group)} ({group.count})"
        stacked.append(Text(("! " if group.alert else "") + label, style=style))
        stacked.append(Text("  " + _details(group, texts), style=style))
    parts.append(_Fitted(table, Stack(*stacked)))
    queries = [group for group in snapshot.groups if group.query is not None]
    if queries:
        parts.append(Text("queries (the oldest session of each group):", style="bold"))
    parts.extend(
        Text(f"  {_label(group)}: {_query_text(group.query)}", style="dim", no_wrap=True, overflow="ellipsis")
        for group in queries
    )
    parts.extend(Text(f"{alert.level}: {alert.message}", style=_LEVEL_STYLE[alert.level]) for alert in snapshot.alerts)
    return Stack(*parts)


def _details(group: Group, texts: list[str]) -> str:
    """A group's figures on one line, labelled (the narrow view's second line)."""
    details = [f"on lock {texts[3]}"] if group.waiting_on_lock else []
    details += [f"in state {texts[4]}", f"xact {texts[5]}", f"query {texts[6]}"]
    return " · ".join(details)


class _Fitted:
    """The table where the terminal is wide enough for it (its widest rows
    fit), else the same rows stacked, two lines per group: squeezed into a
    narrow terminal, the table dropped the APPLICATION column first and
    cut states and ages ("idle in transa…", "4…"), which reads wrong."""

    def __init__(self, table: RenderableType, stacked: RenderableType) -> None:
        self.table = table
        self.stacked = stacked

    def __rich_console__(self, console: Any, options: Any) -> Iterator[RenderableType]:
        from rich.measure import Measurement

        wide = Measurement.get(console, options.update(width=10_000), self.table).maximum
        yield self.table if wide <= options.max_width else self.stacked
