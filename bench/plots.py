"""The sweep's pictures: accuracy against latency (Pareto front marked), against file size, time per stage."""

from __future__ import annotations

from pathlib import Path

STAGE_UNITS = ("summary", "caption", "reasoning", "conclusion")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not beaten by another that is at least as fast and at least as accurate."""
    front = []
    for i, (t, a) in enumerate(points):
        if not any((t2 <= t and a2 >= a) and (t2 < t or a2 > a) for j, (t2, a2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _label(row: dict) -> str:
    return f"{row['backend']} {row['quant']}" + (f"/{row['mmproj_quant']}" if row.get("mmproj_quant") else "") + \
        f" {row['search']}"


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_plots(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    pts = [(r["median_total_s"], r["accuracy"]) for r in rows]
    searches = sorted({r["search"] for r in rows})
    markers = dict(zip(searches, "osD^v<>phX*", strict=False))
    quants = list(dict.fromkeys(f"{r['backend']} {r['quant']}" + (f"/{r['mmproj_quant']}" if r.get("mmproj_quant") else "")
                                for r in rows))
    colors = {q: plt.cm.tab10(i % 10) for i, q in enumerate(quants)}

    def style(r):
        q = f"{r['backend']} {r['quant']}" + (f"/{r['mmproj_quant']}" if r.get("mmproj_quant") else "")
        return {"marker": markers[r["search"]], "color": colors[q]}

    def legends(ax):
        from matplotlib.lines import Line2D

        h1 = [Line2D([], [], ls="", marker=markers[s], color="grey", label=s) for s in searches]
        h2 = [Line2D([], [], ls="", marker="s", color=colors[q], label=q) for q in quants]
        first = ax.legend(handles=h1, title="search", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
                          title_fontsize=8)
        ax.add_artist(first)
        ax.legend(handles=h2, title="model files", loc="lower left", bbox_to_anchor=(1.01, 0.0), fontsize=7,
                  title_fontsize=8)

    def accuracy_plot(x_key: str, xlabel: str, title: str, log_x: bool):
        """Accuracy against one measure, one point per cell; returns the axes."""
        fig, ax = plt.subplots(figsize=(9.5, 5.5))
        for r in rows:
            if r.get(x_key):
                ax.scatter(r[x_key], r["accuracy"], s=55, alpha=0.85, **style(r))
        if log_x:
            ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel="exact-match accuracy", title=title)
        ax.grid(alpha=0.3)
        legends(ax)
        return fig, ax

    fig, ax = accuracy_plot("median_total_s", "median seconds per question (log)",
                            "Accuracy against latency (dashed: Pareto front, labelled)", True)
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1)
    for i in front:
        ax.annotate(_label(rows[i]), pts[i], fontsize=7, xytext=(5, 4), textcoords="offset points")
    paths.append(_save(fig, out / "accuracy_vs_latency.png"))
    fig, _ = accuracy_plot("size_mb", "model files (text + projector), MiB", "Accuracy against file size", False)
    paths.append(_save(fig, out / "accuracy_vs_size.png"))

    staged = [r for r in rows if r.get("stage_s")]
    if staged:
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(staged)), 5))
        bottom = [0.0] * len(staged)
        for unit in (*STAGE_UNITS, "judge", "other"):
            vals = [r["stage_s"].get(unit, 0.0) for r in staged]
            ax.bar(range(len(staged)), vals, bottom=bottom, label=unit)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_xticks(range(len(staged)), [_label(r) for r in staged], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("mean seconds per question")
        ax.set_title("Time per stage (decode), judging, and the rest")
        ax.legend(fontsize=8)
        paths.append(_save(fig, out / "time_per_stage.png"))
    return paths
