"""accuracy_cost.png: top-1 error against multiply-adds per image for every member and the
ensembles along the report's order, marker area by parameters (with an area legend),
every point named, and the front of accuracy against cost drawn (Canziani, Paszke and
Culurciello 2016, figure 2's form)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ensemble.core.costs import macs_words  # noqa: E402


def _area(params: float, biggest: float) -> float:
    return 30 + 600 * params / max(biggest, 1)


def plot_accuracy_cost(path: str, report: dict) -> None:
    data = report["accuracy_cost"]
    members, path_points, best = data["members"], data["path"], data["front"]
    budgeted = data.get("budgeted") or []
    biggest = max(p["param_count"] for p in members + path_points + budgeted) or 1
    fig, ax = plt.subplots(figsize=(9, 7.2))
    ax.scatter([p["macs"] for p in members], [p["top1_err"] for p in members],
               s=[_area(p["param_count"], biggest) for p in members], alpha=0.55, color="tab:blue", edgecolor="k")
    ax.scatter([p["macs"] for p in path_points], [p["top1_err"] for p in path_points],
               s=[_area(p["param_count"], biggest) for p in path_points], alpha=0.55, color="tab:orange",
               edgecolor="k", marker="s")
    ax.scatter([p["macs"] for p in budgeted], [p["top1_err"] for p in budgeted],
               s=[_area(p["param_count"], biggest) for p in budgeted], alpha=0.55, color="tab:green",
               edgecolor="k", marker="D")
    ax.scatter([], [], s=60, alpha=0.55, color="tab:blue", edgecolor="k", label="member")  # legend entries
    ax.scatter([], [], s=60, alpha=0.55, color="tab:orange", edgecolor="k", marker="s",
               label=f"ensemble of the first k members ({report['size_curve'][0]['order']} order)")
    ax.step([p["macs"] for p in best], [p["top1_err"] for p in best], where="post", color="k", lw=1.2,
            label=f"front ({data['front_from']})")
    if budgeted:
        ax.scatter([], [], s=60, alpha=0.55, color="tab:green", edgecolor="k", marker="D",
                   label="Caruana's selection within a multiply-add budget")
    shown = {(p["macs"], p["top1_err"]) for p in members + path_points + budgeted}
    others = [p for p in best if (p["macs"], p["top1_err"]) not in shown]  # front subsets drawn nowhere else
    if others:
        ax.scatter([p["macs"] for p in others], [p["top1_err"] for p in others], color="k", marker="x", s=40,
                   label="another subset on the front")
    for p in members + path_points + budgeted + others:
        ax.annotate(p["name"], (p["macs"], p["top1_err"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="multiply-adds per image (log scale; an ensemble: the sum over its members)",
           ylabel=f"top-1 error on {report['dataset']['split']} ({report['dataset']['samples']} images)",
           title="accuracy against inference cost")
    words = matplotlib.ticker.FuncFormatter(lambda x, _: macs_words(x))
    ax.xaxis.set_major_formatter(words)
    # minor ticks named at 2x and 5x only: every one named collides over a few decades
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda x, _: macs_words(x) if f"{x:.0e}"[0] in "25" else ""))
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    for params in sorted({biggest, biggest / 4}):  # the area legend
        ax.scatter([], [], s=_area(params, biggest), color="grey", alpha=0.4, edgecolor="k",
                   label=f"{macs_words(params)} parameters")
    # below the axes, not over them: an ensemble's points fill the upper right
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8, labelspacing=1.3, borderpad=1)
    ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
