"""The replay's timeline figure: success rate and server connections per
second, both pools on the same axes, the leak's start marked."""

from __future__ import annotations

from pathlib import Path

from .config import ReplayConfig
from .report import Summary

COLORS = {"asyncpg": "#d62728", "safepool": "#1f77b4"}


def write_plot(path: Path, summaries: list[Summary], config: ReplayConfig, max_connections: int) -> None:
    # The object API with an Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5.2), dpi=90, layout="constrained")
    FigureCanvasAgg(figure)
    success_ax, connections_ax = figure.subplots(2, 1, sharex=True)
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
        sampled = [s for s in summary.timeline if s.server_connections is not None]
        connections_ax.step(
            [s.t + 1 for s in sampled],
            [s.server_connections for s in sampled],
            where="post",
            label=summary.label,
            color=color,
            linewidth=1.8,
        )
    for ax in (success_ax, connections_ax):
        ax.axvline(config.leak_start, color="0.3", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    success_ax.text(config.leak_start, 50, " leak starts", color="0.3", va="center", fontsize=9)
    success_ax.set_ylim(-5, 105)
    success_ax.set_ylabel("successful requests (%)")
    success_ax.legend(loc="lower left", fontsize=9)
    success_ax.set_title(
        f"{config.rate:g} req/s, {100 * config.leak_probability:g}% of requests leak a connection "
        f"from t={config.leak_start:g} s, pool size {config.pool_size}",
        fontsize=10,
    )
    connections_ax.axhline(config.pool_size, color="0.6", linestyle=":", linewidth=1)
    connections_ax.text(0.2, config.pool_size, "pool max_size", color="0.4", va="bottom", fontsize=8)
    peak = max((s.peak_server_connections or 0 for s in summaries), default=0)
    connections_ax.set_ylim(0, max(peak, config.pool_size) + 3)
    connections_ax.set_ylabel("server connections")
    connections_ax.set_xlabel(f"seconds since the run started (server max_connections={max_connections})")
    figure.savefig(path)
