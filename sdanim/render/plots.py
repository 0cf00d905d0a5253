"""Figures of a run, drawn with matplotlib's object API (no global pyplot state, so the
browser app can draw them from several threads): how evenly a walk moves, and how an
audio track drives it."""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from sdanim.render.store import atomic_write


def _figure(width: float = 7.0, height: float = 3.2):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def smoothness_figure(reports: Mapping[str, dict]):
    """Consecutive-frame distances of one or more renders of a walk, one curve each
    (label: its smoothness report, `sdanim.core.smoothness.smoothness_report`), with
    AID's 1 - Gini in the legend: a flat curve is an even walk, a spike a hard cut."""
    fig = _figure()
    ax = fig.add_subplot()
    for label, report in reports.items():
        distances = np.asarray(report.get("distances", []), dtype=float)
        ax.plot(np.arange(1, len(distances) + 1), distances, marker="o", markersize=3,
                label=f"{label} (1-Gini {report.get('one_minus_gini', 1.0):.3f})")
    ax.set_xlabel("step (frame i-1 to i)")
    ax.set_ylabel("mean |pixel difference|")
    ax.set_title("How evenly the walk moves")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return fig


def audio_figure(strength: np.ndarray, speed: np.ndarray, fps: float, beats: Optional[np.ndarray] = None,
                 tempo: Optional[float] = None, mode: Optional[str] = None):
    """The audio's strength under each frame and the walk's speed (how far each frame
    moves along the keyframe path), against time; beats as vertical lines."""
    fig = _figure(7.0, 4.0)
    top, bottom = fig.subplots(2, 1, sharex=True)
    t = np.arange(len(strength)) / fps
    top.plot(t, strength, color="tab:orange")
    top.set_ylabel({"loudness": "loudness (RMS)", "onsets": "onset strength", "beats": "onset strength"}.get(mode, "audio strength"))
    title = "Audio and the walk's speed" + (f" (tempo {tempo:.1f} BPM)" if tempo else "")
    top.set_title(title)
    bottom.plot(t[: len(speed)], speed, color="tab:blue")
    bottom.set_ylabel("path per frame")
    bottom.set_xlabel("time (s)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        if beats is not None:
            for b in beats:
                ax.axvline(float(b), color="grey", alpha=0.35, linewidth=0.8)
    return fig


def save_figure(fig, path: str) -> str:
    """Writes a figure as PNG, atomically; returns the path."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path
