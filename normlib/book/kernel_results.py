"""The GPU check's results files (``results/gpu/*.json``, written by ``make gpu-check``) read back
and drawn for chapter 7: the fraction of a copy's bandwidth each implementation reaches, against
the row width, one line per implementation and run, each run labelled with its device and date."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from normlib.bench import read_json
from normlib.bench.gpu_check import GOAL_COPY_FRACTION, GOAL_MIN_HIDDEN
from normlib.bench.report import Result
from normlib.book.plots import page_figure

OP_TITLES = {"layer_norm": "LayerNorm", "rms_norm": "RMSNorm", "add_layer_norm": "residual add + LayerNorm",
             "add_rms_norm": "residual add + RMSNorm", "dyt": "DyT"}
# One colour per implementation in every panel; runs are told apart by their line style.
IMPLEMENTATION_COLORS = {"triton": "tab:green", "torch.compile": "tab:orange", "liger": "tab:purple",
                         "torch.nn.functional": "tab:blue", "torch eager": "tab:cyan", "composite": "tab:red"}
RUN_STYLES = ("-", "--", ":", "-.")


@dataclass
class Run:
    """One results file: its metadata, its results, and how figures name it (device, date)."""

    path: Path
    metadata: dict
    results: list[Result]

    @property
    def label(self) -> str:
        date = str(self.metadata.get("date_utc", ""))[:10]
        dry = ", dry run" if self.metadata.get("dry_run") else ""
        return f"{self.metadata.get('device', 'unknown device')}, {date}{dry}"


def load_runs(paths: Sequence[Path]) -> list[Run]:
    """The runs of ``paths`` in the order given (sort the paths for a stable order)."""
    return [Run(Path(path), *read_json(Path(path))) for path in paths]


def plot_runs(runs: Sequence[Run], dtype: str = "bf16", mode: str = "fwd+bwd",
              implementations: Sequence[str] = ("triton", "torch.compile", "liger")):
    """Fraction of the copy's bandwidth against the features per row, one panel per op, for
    ``dtype`` and ``mode``; the goal drawn as a dotted line from ``GOAL_MIN_HIDDEN`` features on.
    Returns the figure, or None when ``runs`` is empty (nothing to draw)."""
    if not runs:
        return None
    ops = list(dict.fromkeys(r.op for run in runs for r in run.results if r.dtype == dtype and r.mode == mode))
    fig, axes = page_figure(max(1, len(ops)), per_row=2, panel_height=2.8, sharey=True)
    axes = [axes] if not isinstance(axes, list) else axes
    for ax, op in zip(axes, ops):
        for run_index, run in enumerate(runs):
            for implementation in implementations:
                points = sorted((r.hidden, 100 * r.peak_fraction) for r in run.results
                                if r.op == op and r.dtype == dtype and r.mode == mode
                                and r.implementation == implementation and r.peak_fraction is not None)
                if points:
                    ax.plot(*zip(*points), marker="o", linestyle=RUN_STYLES[run_index % len(RUN_STYLES)],
                            color=IMPLEMENTATION_COLORS.get(implementation), label=f"{implementation} ({run.label})")
        ax.axhline(100 * GOAL_COPY_FRACTION, xmin=0, color="grey", linestyle=":", label="goal")
        ax.axvline(GOAL_MIN_HIDDEN, color="lightgrey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 105)
        ax.set_title(f"{OP_TITLES.get(op, op)}, {dtype} {mode}", fontsize="medium")
        ax.set_xlabel("features per row, C")
        ax.set_ylabel("of copy bandwidth (%)")
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=1, fontsize="small")
    return fig


def goal_summary(run: Run) -> list[str]:
    """The goal's lines as the GPU check printed them for ``run`` (empty for older files)."""
    return list(run.metadata.get("goal", {}).get("lines", []))


def latest(paths: Sequence[Path]) -> Optional[Path]:
    """The path whose name sorts last (the names end in the date), or None."""
    return max(paths, key=lambda p: Path(p).name, default=None)
