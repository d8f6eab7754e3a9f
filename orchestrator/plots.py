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
    values = [base_lr * lr_policies.multiplier(schedule.policy, s, total, warmup, **schedule.params) for s in steps]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s / steps_per_epoch for s in steps], values)
    ax.set(xlabel="epoch", ylabel="learning rate", title=f"{title}: {schedule.policy}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(path: str, history: list[dict], title: str) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    a.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    b.plot(epochs, [h["val_top1_err"] for h in history], label="val top-1 error")
    b.plot(epochs, [h["val_top5_err"] for h in history], label="val top-5 error")
    for ax in (a, b):
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
