"""Training curves from the ``log_history`` a trained policy keeps (``training_run.json``):
the loss, DPO's reward margin and the probe penalty per optimizer step, one line per arm."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

# (log_history key, panel title): the panels drawn when any arm logged the key
CURVES = (("loss", "training loss"), ("rewards/margins", "reward margin (chosen - rejected)"),
          ("probe_penalty", "probe penalty"))


def curve_points(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged quantity (the training-step entries only)."""
    steps, values = [], []
    for entry in history:
        if key in entry and "step" in entry and "train_runtime" not in entry:
            try:
                value = float(entry[key])
            except (TypeError, ValueError):
                continue
            steps.append(int(entry["step"]))
            values.append(value)
    return steps, values


def training_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]]):
    """A figure with one panel per quantity any arm logged (``CURVES``) and one line per arm;
    None when no arm logged any."""
    import matplotlib.pyplot as plt

    panels = [(k, t) for k, t in CURVES if any(curve_points(h, k)[0] for h in histories.values())]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for arm, history in histories.items():
            steps, values = curve_points(history, key)
            if steps:
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=arm)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
