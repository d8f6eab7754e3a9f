"""PNG plots logged as MLflow artifacts: an LR schedule, a member's per-epoch curves."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from orchestrator.train import lr as lr_policies  # noqa: E402


def plot_lr_schedule(path: str, schedule, base_lr: float, steps_per_epoch: int, epochs: int, title: str) -> None:
    total = steps_per_epoch * epochs
    warmup = round(schedule.warmup_epochs * steps_per_epoch)
    steps = range(total)
    at = lr_policies.schedule(schedule.policy, total, warmup, schedule.params)
    values = [base_lr * at(s) for s in steps]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s / steps_per_epoch for s in steps], values)
    ax.set(xlabel="epoch", ylabel="learning rate", title=f"{title}: {schedule.policy}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(path: str, history: list[dict], title: str) -> None:
    epochs = [h["epoch"] for h in history]
    held = "minival" if "minival_loss" in history[-1] else "val"  # the per-epoch held-out split
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    a.plot(epochs, [h[f"{held}_loss"] for h in history], label=f"{held} loss")
    b.plot(epochs, [h[f"{held}_top1_err"] for h in history], label=f"{held} top-1 error")
    b.plot(epochs, [h[f"{held}_top5_err"] for h in history], label=f"{held} top-5 error")
    for ax in (a, b):
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_lr_policies(path: str, warmup_fraction: float = 0.05) -> None:
    """Every registered LR policy over a run (default hyperparameters, with and without a
    linear warm-up): what a search's `recipe.schedule.policy` chooses between."""
    total = 1000
    names = lr_policies.list_policies()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, warm in zip(axes, (0, round(warmup_fraction * total))):
        for name in names:
            ax.plot([s / total for s in range(total)],
                    list(map(lr_policies.schedule(name, total, warm), range(total))), label=name)
        ax.set(xlabel="fraction of training", title=f"warm-up {warm / total:.0%}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("LR / peak LR")
    axes[1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def trial_label(trial_id: str, overrides: dict, final: float | None = None) -> str:
    """A trial as its legend names it: the id's last part, then each searched field's last
    name and value (`00002: onecycle, lr 0.034 -> 0.775`)."""
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    values = [fmt(v) if k.endswith(".policy") else f"{k.rsplit('.', 1)[-1]} {fmt(v)}" for k, v in overrides.items()]
    end = f" -> {final:.3f}" if final is not None else ""
    return f"{trial_id.rsplit('_', 1)[-1]}: {', '.join(values)}{end}"


def plot_trials(path: str, histories: dict[str, list[dict]], metric: str = "val_top1_err",
                labels: dict[str, str] | None = None) -> None:
    """Every trial's val metric per epoch: ASHA's early stops show as short lines, PBT's
    exploit steps as jumps. The legend (beside the axes, up to 12 trials) names each trial
    by `labels` (its searched values), best final value first."""
    from matplotlib.ticker import MaxNLocator

    labels = labels or {}
    shown = len(histories) <= 12
    fig, ax = plt.subplots(figsize=(11 if shown else 7, 4))
    order = sorted(histories, key=lambda n: histories[n][-1][metric] if histories[n] else float("inf"))
    for name in order:
        hist = histories[name]
        ax.plot([h["epoch"] for h in hist], [h[metric] for h in hist], marker="o", ms=3, label=labels.get(name, name))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel=metric, title=f"search trials ({len(histories)}), legend best first")
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parallel_axes(rows: list[dict], axes: list[str]) -> list[tuple[list[float], list[tuple[float, str]]]]:
    """Per axis: each row's position in [0, 1] and the labelled ticks. Numbers are scaled
    between their extremes (a range over 4x wide on a log scale, as searched LRs are),
    labelled at each of up to 5 levels, else at both ends; anything else is a category, labelled at its place."""
    import math

    out = []
    for k in axes:
        vals = [r.get(k) for r in rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            lo, hi = min(vals), max(vals)
            log = lo > 0 and hi > 4 * lo
            f = math.log if log else float
            span = f(hi) - f(lo)
            pos = [(f(v) - f(lo)) / span if span else 0.5 for v in vals]
            marks = sorted(set(vals)) if len(set(vals)) <= 5 else [lo, hi]  # a few levels: each one
            ticks = [((f(v) - f(lo)) / span if span else 0.5, f"{v:.3g}") for v in marks]
            if log:
                ticks[-1] = (ticks[-1][0], ticks[-1][1] + " (log)")
        else:
            cats = sorted({str(v) for v in vals})
            pos = [(cats.index(str(v)) + 0.5) / len(cats) for v in vals]
            ticks = [((i + 0.5) / len(cats), c) for i, c in enumerate(cats)]
        out.append((pos, ticks))
    return out


def plot_parallel(path: str, rows: list[dict], keys: list[str], metric: str) -> None:
    """Parallel coordinates of the searched fields, one line per trial coloured by its
    final metric (lower = darker, the colour bar); each axis labelled with its values."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(6, 2 * len(keys) + 3), 4.5))
    axes = keys + [metric]
    placed = parallel_axes(rows, axes)
    final = np.array([r[metric] for r in rows], dtype=float)
    norm = plt.Normalize(final.min(), final.max() if np.ptp(final) else final.min() + 1)
    for j in range(len(rows)):
        ax.plot(range(len(axes)), [pos[j] for pos, _ in placed], color=plt.cm.viridis(norm(final[j])), alpha=0.8)
    for i, (_, ticks) in enumerate(placed):
        ax.axvline(i, color="0.6", lw=0.8, zorder=0)
        for y, label in ticks:
            ax.text(i + 0.04, y, label, fontsize=7, va="center", ha="left",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7})
    ax.set_xticks(range(len(axes)), [a.rsplit(".", 1)[-1] for a in axes], rotation=20)
    ax.set_xlim(-0.2, len(axes) - 0.4)
    ax.set_ylim(-0.08, 1.08)
    ax.set_yticks([])
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, pad=0.01, label=metric)
    ax.set_title(f"{len(rows)} trials: searched fields -> {metric} (each line a trial)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
