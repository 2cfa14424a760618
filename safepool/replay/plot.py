"""A scenario's timeline figure: success rate per second, then server
connections (goodput for the surge), both pools on the same axes, the
fault marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ReplayConfig
from .report import Summary, title

COLORS = {"asyncpg": "#d62728", "safepool": "#1f77b4"}
FAULT_LABELS = {
    "leak": "leak starts",
    "stuck": "provider hangs",
    "surge": "surge",
    "restart": "server down",
}


def _mark_fault(ax: Any, config: ReplayConfig, summaries: list[Summary], label: bool) -> None:
    if config.scenario == "surge":
        ax.axvspan(config.leak_start, config.surge_end, color="0.85", alpha=0.6, linewidth=0)
    elif config.scenario == "restart":
        marks = next((s.marks for s in summaries if "stopped" in s.marks and "accepting" in s.marks), None)
        if marks is not None:
            ax.axvspan(marks["stopped"], marks["accepting"], color="0.85", alpha=0.6, linewidth=0)
    else:
        ax.axvline(config.leak_start, color="0.3", linestyle="--", linewidth=1)
    if label:
        ax.text(config.leak_start, 50, f" {FAULT_LABELS[config.scenario]}", color="0.3", va="center", fontsize=9)


def write_plot(path: Path, summaries: list[Summary], config: ReplayConfig, max_connections: int) -> None:
    # The object API with an Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5.2), dpi=90, layout="constrained")
    FigureCanvasAgg(figure)
    success_ax, lower_ax = figure.subplots(2, 1, sharex=True)
    surge = config.scenario == "surge"
    for summary in summaries:
        seconds = [s for s in summary.timeline if s.requests]
        color = COLORS.get(summary.pool)
        success_ax.plot(
            [s.t + 0.5 for s in seconds],
            [100 * (s.success or 0.0) for s in seconds],
            label=summary.label,
            color=color,
            linewidth=1.8,
        )
        if surge:
            lower_ax.plot(
                [s.t + 0.5 for s in summary.timeline],
                [s.ok for s in summary.timeline],
                label=summary.label,
                color=color,
                linewidth=1.8,
            )
        else:
            sampled = [s for s in summary.timeline if s.server_connections is not None]
            lower_ax.step(
                [s.t + 1 for s in sampled],
                [s.server_connections for s in sampled],
                where="post",
                label=summary.label,
                color=color,
                linewidth=1.8,
            )
    for ax in (success_ax, lower_ax):
        _mark_fault(ax, config, summaries, label=ax is success_ax)
        ax.grid(alpha=0.3)
    success_ax.set_ylim(-5, 105)
    success_ax.set_ylabel("successful requests (%)")
    success_ax.legend(loc="lower left", fontsize=9)
    success_ax.set_title(title(config), fontsize=9)
    if surge:
        lower_ax.axhline(config.capacity, color="0.6", linestyle=":", linewidth=1)
        lower_ax.text(0.2, config.capacity, "pool capacity", color="0.4", va="bottom", fontsize=8)
        peak = max((s.ok for summary in summaries for s in summary.timeline), default=0)
        lower_ax.set_ylim(0, max(peak, config.capacity) * 1.2)
        lower_ax.set_ylabel("goodput (2xx answers/s)")
        lower_ax.set_xlabel("seconds since the run started (answers by the second they completed)")
    else:
        lower_ax.axhline(config.pool_size, color="0.6", linestyle=":", linewidth=1)
        lower_ax.text(0.2, config.pool_size, "pool max_size", color="0.4", va="bottom", fontsize=8)
        peak = max((s.peak_server_connections or 0 for s in summaries), default=0)
        lower_ax.set_ylim(0, max(peak, config.pool_size) + 3)
        lower_ax.set_ylabel("server connections")
        lower_ax.set_xlabel(f"seconds since the run started (server max_connections={max_connections})")
    figure.savefig(path)
