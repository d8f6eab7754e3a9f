"""The evaluation report: console table, JSON (fixed schema), CSV and PNG plots."""
from __future__ import annotations

import csv
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from rich.table import Table  # noqa: E402

from ensemble.views.cost_plot import plot_accuracy_cost  # noqa: E402
from ensemble.core.costs import macs_words  # noqa: E402
from orchestrator.views.terminal import console  # noqa: E402




def _err(row: dict, key: str) -> str:
    ci = row.get(f"{key}_ci")
    return f"{row[key]:.2%}" + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else "")


def best_words(report: dict) -> tuple[str, str]:
    """(who, where): "best member" and where it was chosen, or "best on val (optimistic)"
    when it was chosen on the rows it is reported on (ensemble/evaluate.py: choose_best)."""
    on = report["ensemble"].get("best_member_chosen_on", "val")
    if on == "minival":
        return "best member", " (chosen on the minival)"
    if on == "held-out":
        return "best member", f" (chosen on {report['best_member']['chosen_samples']} held-out rows)"
    return f"best on {report['dataset']['split']} (optimistic)", ""


def headline(report: dict) -> list[str]:
    """The ensemble against its best member, per metric, in points and relative, with the
    gain's 95% bootstrap interval (paired: one resample of rows for both)."""
    e, members = report["ensemble"], {m["name"]: m for m in report["members"]}
    who, where = best_words(report)
    lines = []
    for k in (1, 5):
        best = members[e.get(f"best_member_top{k}") or report["best_member"]["name"]]
        gain, ci = e[f"gain_top{k}_over_best"], e.get(f"gain_top{k}_over_best_ci")
        rel = gain / best[f"top{k}_err"] if best[f"top{k}_err"] else 0.0
        interval = f" [{ci[0] * 100:+.2f}, {ci[1] * 100:+.2f}]" if ci else ""
        lines.append(f"top-{k} error: ensemble {e[f'top{k}_err']:.2%} vs {who} {best['name']} "
                     f"{best[f'top{k}_err']:.2%}{where}: {gain * 100:+.2f} points{interval} ({rel:+.1%} relative)")
    return lines


def markdown(report: dict) -> str:
    """The result as Markdown (the parent run's description): the table with the ensemble's
    row first, then its members, then the headline. The MLflow UI folds a long description
    behind "Show more" after its first lines, so what the run is for comes first."""
    ds, e = report["dataset"], report["ensemble"]
    lines = [f"**{ds['name']} {ds['split']}**: {ds['samples']} samples, {ds['num_classes']} classes "
             f"(95% bootstrap intervals)", "", "| model | top-1 err | top-5 err | NLL |", "|---|---|---|---|",
             f"| **ensemble** ({e['method']}, {len(set(e['members']))} members) | **{_err(e, 'top1_err')}** | "
             f"**{_err(e, 'top5_err')}** | {e['nll']:.3f} |"]
    for m in report["members"]:
        lines.append(f"| {m['name']} | {_err(m, 'top1_err')} | {_err(m, 'top5_err')} | {m['nll']:.3f} |")
    return "\n".join(lines + [""] + [f"- {line}" for line in headline(report)])


def print_table(report: dict) -> None:
    ds = report["dataset"]
    table = Table(title=f"{ds['name']} {ds['split']}: {ds['samples']} samples, {ds['num_classes']} classes "
                        f"(errors with 95% bootstrap intervals)")
    e = report["ensemble"]
    costs = e.get("cost") is not None  # members record what they cost to run (ensemble/core/costs.py)
    for col in ("model", "top-1 err", "top-5 err", "NLL", "ECE") + (("MACs", "ms/img b1") if costs else ()):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in report["members"]:
        table.add_row(m["name"], _err(m, "top1_err"), _err(m, "top5_err"), f"{m['nll']:.3f}", f"{m['ece']:.3f}",
                      *((macs_words(m["macs"]), f"{m['infer_ms_b1']:.1f}") if costs else ()))
    table.add_row(f"[bold]ensemble ({e['method']}, {len(set(e['members']))} members)[/]",
                  f"[bold]{_err(e, 'top1_err')}", f"[bold]{_err(e, 'top5_err')}", f"{e['nll']:.3f}", f"{e['ece']:.3f}",
                  *((macs_words(e["cost"]["macs"]), f"{e['cost']['infer_ms_b1']:.1f}") if costs else ()))
    console().print(table)
    for line in headline(report):
        console().print(line)
    console().print(f"oracle top-1 error {e['oracle_top1_err']:.2%}")
    proto = report.get("protocol")
    if proto:
        console().print(f"chosen on: {proto['chosen_on']}; reported on: {proto['reported_on']}")
        for c in proto["choices"]:
            console().print(f"  {c['what']}: chosen on {c['split']}")
        for note in proto["notes"]:
            console().print(f"  [yellow]note:[/] {note}")
    if report.get("selection"):
        s = report["selection"]
        if s.get("weights"):
            console().print(f"selection on {s['samples']} samples: weights "
                          + ", ".join(f"{k}={v:.2f}" for k, v in s["weights"].items() if v > 0))
    budget = (report.get("selection") or {}).get("budget")
    if budget:
        unit = macs_words if budget["kind"] == "macs" else (lambda x: f"{x:.1f} ms")
        console().print(f"budget {unit(budget['limit'])}: the selection costs {unit(budget['cost'])} "
                        f"(unbudgeted {unit(budget['unbudgeted_cost'])}); top-1 error {budget['top1_err_cost']:+.2%} "
                        f"and top-5 {budget['top5_err_cost']:+.2%} against the unbudgeted choice")
    if report.get("tta") and report["tta"]["mode"] != "none":
        console().print(f"test-time augmentation {report['tta']['mode']}: {report['tta']['inference_cost']:g}x "
                      "the inference of one view per member")


def write_json(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def write_csv(path: str, report: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "top1_err", "top5_err", "nll", "ece", "weight"])
        weights = (report.get("selection") or {}).get("weights") or {}
        for m in report["members"]:
            w.writerow([m["name"], m["top1_err"], m["top5_err"], m["nll"], m["ece"], weights.get(m["name"], "")])
        e = report["ensemble"]
        w.writerow([f"ensemble:{e['method']}", e["top1_err"], e["top5_err"], e["nll"], e["ece"], ""])


# one colour per metric in every plot (matplotlib's first two cycle colours)
COLOURS = {"top1": "tab:blue", "top5": "tab:orange"}
ORDER_WORDS = {"greedy": "the order greedy selection added them",
               "sorted": "best member first (by own top-5 error)"}


def plot_size_curve(path: str, report: dict) -> None:
    curve = report["size_curve"]
    ks = [c["k"] for c in curve]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    order = curve[0].get("order", "greedy")
    for k in ("top1", "top5"):
        ax.plot(ks, [c[f"{k}_err"] for c in curve], "o-", color=COLOURS[k], label=f"{k[:3]}-{k[3]} error")
        if f"random_{k}_err" in curve[0]:
            ax.plot(ks, [c[f"random_{k}_err"] for c in curve], "--", color=COLOURS[k],
                    label=f"{k[:3]}-{k[3]}, mean of random orders")
    ax.set(xlabel=f"members in the ensemble, added in {ORDER_WORDS.get(order, order)}", ylabel="error",
           title="error against ensemble size")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_members(path: str, report: dict) -> None:
    """Members and, set apart on the right, the ensemble: top-1 and top-5 error with the
    value on each bar; the legend sits above the axes, where it covers nothing."""
    members, e = report["members"], report["ensemble"]
    names = [m["name"] for m in members] + ["ensemble"]
    x = [float(i) for i in range(len(members))] + [len(members) + 0.6]  # a gap before the ensemble
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(names) + 1.5), 4.8))
    for shift, k in ((-0.2, "top1"), (0.2, "top5")):
        values = [m[f"{k}_err"] for m in members] + [e[f"{k}_err"]]
        bars = ax.bar([i + shift for i in x], values, 0.4, color=COLOURS[k], label=f"{k[:3]}-{k[3]} error")
        bars[-1].set_edgecolor("black")
        bars[-1].set_linewidth(1.5)
        ax.bar_label(bars, labels=[f"{v:.1%}" for v in values], fontsize=6, padding=1, rotation=90)
    ax.axvline(len(members) - 0.2, color="grey", lw=0.8, ls=":")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    ax.get_xticklabels()[-1].set_fontweight("bold")
    ax.set_ylim(0, min(1.0, max(max(m["top1_err"] for m in members), e["top1_err"]) * 1.25 + 0.02))
    ax.set_ylabel("error")
    ax.set_title("members and their ensemble", loc="left")
    # above the axes, right of the title: below them it would meet long rotated member names
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(path: str, reliability: dict) -> None:
    """Accuracy per confidence bin, with the number of samples in each bin over its bar."""
    conf, acc, count = reliability["confidence"], reliability["accuracy"], reliability["count"]
    keep = [i for i, c in enumerate(count) if c > 0]
    fig, ax = plt.subplots(figsize=(5, 4.8))
    ax.plot([0, 1], [0, 1], "k:", label="perfect calibration")
    bars = ax.bar([conf[i] for i in keep], [acc[i] for i in keep], width=1 / len(count), alpha=0.7,
                  edgecolor="k", color=COLOURS["top1"], label="ensemble (top-1)")
    ax.bar_label(bars, labels=[f"n={int(count[i])}" for i in keep], fontsize=6, padding=1, rotation=90)
    ax.set(xlabel="confidence (top-1 probability)", ylabel="accuracy", title=f"reliability ({len(count)} bins)",
           xlim=(0, 1), ylim=(0, 1.12))
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_folder(out: str, report: dict, reliability: dict) -> list[str]:
    os.makedirs(out, exist_ok=True)
    names = ("report.json", "report.csv", "size_curve.png", "members.png", "reliability.png")
    paths = {name: os.path.join(out, name) for name in names + (("accuracy_cost.png",) if report.get("accuracy_cost")
                                                                 else ())}
    write_json(paths["report.json"], report)
    write_csv(paths["report.csv"], report)
    plot_size_curve(paths["size_curve.png"], report)
    plot_members(paths["members.png"], report)
    plot_reliability(paths["reliability.png"], reliability)
    if "accuracy_cost.png" in paths:
        plot_accuracy_cost(paths["accuracy_cost.png"], report)
    return list(paths.values())
