"""Reports: markdown tables (paper's table 2 / 3 style), CSV and PNG figures.

Inputs are the pure summaries of ``metrics``; outputs are files. Figures use
matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import math
import pathlib
from typing import Any, Mapping, Sequence

from caspo_jax.evals.metrics import DIM_LETTER, DIMENSIONS, Delta, ModeSummary, item_average
from caspo_jax.evals.token_shift import CLASSES


def _f(x: float, nd: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _p(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def main_table(summaries: Mapping[str, ModeSummary]) -> str:
    """Table 2 style: per mode X_A and X_0 (%) of R, S, E, plus coverage."""
    head = ["mode"] + [f"{DIM_LETTER[d]}{s}" for d in DIMENSIONS for s in ("_A", "_0 %")] + ["covered / items", "judgements ok"]
    lines = [_row(head), _row(["---"] * len(head))]
    for mode, s in summaries.items():
        cells = [mode]
        for d in DIMENSIONS:
            cells += [_f(s.dims[d].mean), _p(s.dims[d].zero_rate_per_judge)]
        c = s.coverage
        cells += [f"{c.covered_items} / {c.items}", f"{c.judgements_ok} / {c.judgements_total}"]
        lines.append(_row(cells))
    return "\n".join(lines)


def zero_items_table(summaries: Mapping[str, ModeSummary]) -> str:
    head = ["mode"] + [f"{DIM_LETTER[d]}_0 % (averaged items)" for d in DIMENSIONS]
    lines = [_row(head), _row(["---"] * len(head))]
    for mode, s in summaries.items():
        lines.append(_row([mode] + [_p(s.dims[d].zero_rate_items) for d in DIMENSIONS]))
    return "\n".join(lines)


def distribution_table(summaries: Mapping[str, ModeSummary]) -> str:
    """Shares of scores 0/1/2 per dimension (tables 5-7 style), per judge averaged."""
    head = ["mode"] + [f"{DIM_LETTER[d]} {v} %" for d in DIMENSIONS for v in (0, 1, 2)]
    lines = [_row(head), _row(["---"] * len(head))]
    for mode, s in summaries.items():
        lines.append(_row([mode] + [_p(x) for d in DIMENSIONS for x in s.dims[d].shares]))
    return "\n".join(lines)


def category_table(by_cat: Mapping[str, ModeSummary]) -> str:
    head = ["category"] + [f"{DIM_LETTER[d]}{s}" for d in DIMENSIONS for s in ("_A", "_0 %")] + ["covered / items"]
    lines = [_row(head), _row(["---"] * len(head))]
    for cat, s in by_cat.items():
        cells = [cat]
        for d in DIMENSIONS:
            cells += [_f(s.dims[d].mean), _p(s.dims[d].zero_rate_per_judge)]
        cells.append(f"{s.coverage.covered_items} / {s.coverage.items}")
        lines.append(_row(cells))
    return "\n".join(lines)


def per_judge_table(summaries: Mapping[str, ModeSummary]) -> str:
    judges = sorted({j for s in summaries.values() for j in s.dims["risk"].per_judge_mean})
    head = ["mode", "judge"] + [f"{DIM_LETTER[d]}{s}" for d in DIMENSIONS for s in ("_A", "_0 %")] + ["scored"]
    lines = [_row(head), _row(["---"] * len(head))]
    for mode, s in summaries.items():
        for j in judges:
            cells = [mode, j]
            for d in DIMENSIONS:
                cells += [_f(s.dims[d].per_judge_mean.get(j, math.nan)), _p(s.dims[d].per_judge_zero_rate.get(j, math.nan))]
            cells.append(str(s.coverage.per_judge_ok.get(j, 0)))
            lines.append(_row(cells))
    return "\n".join(lines)


def usage_table(usage: Mapping[str, Mapping[str, Any]]) -> str:
    """``usage[name] = {"role", "items", "prompt_tokens", "completion_tokens", "cost", "temperature_not_applied"}``."""
    head = ["model", "role", "items", "prompt tokens", "completion tokens", "cost", "temperature dropped"]
    lines = [_row(head), _row(["---"] * len(head))]
    for name, u in usage.items():
        cost = u.get("cost")
        lines.append(_row([name, str(u.get("role", "")), str(u.get("items", 0)), str(u.get("prompt_tokens", 0)),
                           str(u.get("completion_tokens", 0)), "-" if cost is None else f"{cost:.4f}",
                           str(u.get("temperature_not_applied", 0))]))
    return "\n".join(lines)


def compare_table(deltas: Mapping[str, Mapping[str, Delta]]) -> str:
    """Table 3 style: after value with the change from before (absolute, relative %)."""
    metrics = [f"{DIM_LETTER[d]}{s}" for d in DIMENSIONS for s in ("_A", "_0")]
    head = ["mode"] + [m + (" %" if m.endswith("_0") else "") for m in metrics]
    lines = [_row(head), _row(["---"] * len(head))]
    for mode, row in deltas.items():
        cells = [mode]
        for m in metrics:
            d = row[m]
            fmt = _p if m.endswith("_0") else _f
            rel = "" if math.isnan(d.relative) else f", {d.relative:+.1f}%"
            absd = f"{d.absolute:+.1f}" if m.endswith("_0") else f"{d.absolute:+.2f}"
            cells.append(f"{fmt(d.after)} ({absd}{rel})" if not math.isnan(d.absolute) else "-")
        lines.append(_row(cells))
    return "\n".join(lines)


def plot_compare(path: pathlib.Path, deltas: Mapping[str, Mapping[str, Delta]], labels: tuple[str, str] = ("before", "after")) -> None:
    """Before/after bars of X_A (left) and X_0 % (right) for R, S, E, one group per mode x dimension."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, suffix, ylabel, top in ((axes[0], "_A", "average score X_A", 2), (axes[1], "_0", "zero-score rate X_0 (%)", 100)):
        names, before, after = [], [], []
        for mode, row in deltas.items():
            for d in DIMENSIONS:
                dl = row[DIM_LETTER[d] + suffix]
                names.append(f"{mode}\n{DIM_LETTER[d]}")
                before.append(0.0 if math.isnan(dl.before) else dl.before)
                after.append(0.0 if math.isnan(dl.after) else dl.after)
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], before, 0.4, label=labels[0])
        ax.bar([x + 0.2 for x in xs], after, 0.4, label=labels[1])
        ax.set_xticks(list(xs), names, fontsize=7)
        ax.set_ylim(0, top)
        ax.set_ylabel(ylabel)
    axes[0].legend()
    fig.suptitle(f"{labels[1]} vs {labels[0]}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_compare_csv(path: pathlib.Path, deltas: Mapping[str, Mapping[str, Delta]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mode", "metric", "before", "after", "absolute", "relative_pct"])
        for mode, row in deltas.items():
            for m, d in row.items():
                w.writerow([mode, m, d.before, d.after, d.absolute, d.relative])


def plot_token_shift(path: pathlib.Path, results: Mapping[str, Any], title: str = "") -> None:
    """Stacked class shares of the top-K shifted tokens per comparison (the paper's figure 5).

    ``results[label]`` is a ``token_shift.TokenShiftResult`` (e.g. "DPO vs base").
    """
    plt = _plt()
    labels = list(results)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(labels)), 3.6))
    bottom = [0.0] * len(labels)
    for cls in CLASSES:
        vals = [results[l].shares[cls] for l in labels]
        ax.bar(labels, vals, 0.6, bottom=bottom, label=cls)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of top-K shifted tokens")
    ax.legend(fontsize=8)
    ax.set_title(title or "token classes of the largest log-prob shifts")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_items_csv(path: pathlib.Path, by_mode: Mapping[str, Sequence[Any]], judges: Sequence[str]) -> None:
    """One row per (mode, item): each judge's R/S/E (blank = failed) and the judge average."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mode", "item", "category"] + [f"{j}_{DIM_LETTER[d]}" for j in judges for d in DIMENSIONS]
                   + [f"avg_{DIM_LETTER[d]}" for d in DIMENSIONS])
        for mode, items in by_mode.items():
            for it in items:
                cells = [mode, it.item_id, it.category or ""]
                for j in judges:
                    t = it.judges.get(j)
                    cells += ["" if t is None else v for v in (t or (None,) * 3)]
                avg = item_average(it, judges, require_all=False)
                cells += ["" if avg is None else round(v, 4) for v in (avg or (None,) * 3)]
                w.writerow(cells)


def write_csv(path: pathlib.Path, summaries: Mapping[str, ModeSummary], by_cat: Mapping[str, Mapping[str, ModeSummary]]) -> None:
    """Long format: one row per (mode, category, dimension); category "all" = overall."""
    fields = ["mode", "category", "dimension", "X_A", "X_0_per_judge", "X_0_items", "share_0", "share_1", "share_2", "covered", "items"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for mode, s in summaries.items():
            for cat, cs in [("all", s)] + list(by_cat.get(mode, {}).items()):
                for d in DIMENSIONS:
                    st = cs.dims[d]
                    w.writerow([mode, cat, DIM_LETTER[d], st.mean, st.zero_rate_per_judge, st.zero_rate_items,
                                *st.shares, cs.coverage.covered_items, cs.coverage.items])


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_modes(path: pathlib.Path, summaries: Mapping[str, ModeSummary], title: str = "") -> None:
    """Mode comparison: X_A (left) and X_0 % (right) of R, S, E, grouped by mode."""
    plt = _plt()
    modes = list(summaries)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / len(DIMENSIONS)
    for k, (ax, key, label) in enumerate([(axes[0], "mean", "average score X_A"), (axes[1], "zero_rate_per_judge", "zero-score rate X_0 (%)")]):
        for i, d in enumerate(DIMENSIONS):
            vals = [getattr(summaries[m].dims[d], key) for m in modes]
            vals = [0.0 if math.isnan(v) else v for v in vals]
            ax.bar([x + i * width for x in range(len(modes))], vals, width, label=DIM_LETTER[d])
        ax.set_xticks([x + width for x in range(len(modes))], modes)
        ax.set_ylabel(label)
        ax.set_ylim(0, 2 if key == "mean" else 100)
    axes[0].legend()
    fig.suptitle(title or "OOD-MMSafe-style scores by mode")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_categories(path: pathlib.Path, by_cat: Mapping[str, ModeSummary], title: str = "") -> None:
    """Per-category X_A bars of R, S, E (the paper's figures 7-8 as bars)."""
    plt = _plt()
    cats = list(by_cat)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cats)), 3.6))
    width = 0.8 / len(DIMENSIONS)
    for i, d in enumerate(DIMENSIONS):
        vals = [by_cat[c].dims[d].mean for c in cats]
        ax.bar([x + i * width for x in range(len(cats))], [0.0 if math.isnan(v) else v for v in vals], width, label=DIM_LETTER[d])
    ax.set_xticks([x + width for x in range(len(cats))], cats, rotation=20)
    ax.set_ylim(0, 2)
    ax.set_ylabel("average score X_A")
    ax.legend()
    ax.set_title(title or "per category")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(
    out_dir: str | pathlib.Path,
    summaries: Mapping[str, ModeSummary],
    by_cat: Mapping[str, Mapping[str, ModeSummary]],
    *,
    usage: Mapping[str, Mapping[str, Any]] | None = None,
    extra_sections: Sequence[tuple[str, str]] = (),
    title: str = "Evaluation report",
    notes: Sequence[str] = (),
) -> dict[str, pathlib.Path]:
    """Write report.md, summary.csv and PNG figures into ``out_dir``; returns their paths."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, pathlib.Path] = {"markdown": out / "report.md", "csv": out / "summary.csv"}
    parts = [f"# {title}", ""]
    parts += [f"- {n}" for n in notes]
    if summaries:
        parts += [
            "", "## Scores by mode (X_A: average 0-2; X_0: % zero scores, per judge averaged)", "", main_table(summaries),
            "", "## X_0 on judge-averaged item scores", "", zero_items_table(summaries),
            "", "## Score distribution (% of 0 / 1 / 2, per judge averaged)", "", distribution_table(summaries),
            "", "## Per judge", "", per_judge_table(summaries),
        ]
        for mode, cats in by_cat.items():
            parts += ["", f"## Per category: {mode}", "", category_table(cats)]
    if usage:
        parts += ["", "## Token usage and cost", "", usage_table(usage)]
    for head, body in extra_sections:
        parts += ["", f"## {head}", "", body]
    if summaries:
        paths["fig_modes"] = out / "modes.png"
        plot_modes(paths["fig_modes"], summaries)
        for mode, cats in by_cat.items():
            p = out / f"categories_{mode}.png"
            plot_categories(p, cats, title=f"per category: {mode}")
            paths[f"fig_categories_{mode}"] = p
        parts += ["", "## Figures", ""] + [f"![{k}]({p.name})" for k, p in paths.items() if k.startswith("fig")]
        write_csv(paths["csv"], summaries, by_cat)
    else:
        paths.pop("csv")
    paths["markdown"].write_text("\n".join(parts) + "\n")
    return paths
