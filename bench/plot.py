"""bench --plot FILE: the rows drawn with matplotlib (an optional
dependency: pip install 'fayt-portals[plot]').

Left: each row's ratio against its peer (log scale; 1 is parity), the
target drawn as a tick where the row has one, green where it is met.
Right: the contention case's throughput against the process count, one
line per lock (ours and each peer)."""
import os

FORMATS = (".png", ".svg", ".pdf")


def check(path):
    """Before the run: matplotlib importable and a format it writes."""
    if os.path.splitext(path)[1].lower() not in FORMATS:
        raise ValueError("%s: the file name must end in %s" % (path, ", ".join(FORMATS)))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("matplotlib is not installed (pip install 'fayt-portals[plot]', "
                          "or pip install matplotlib)") from None


def _met(r):
    op, val = r["target"]
    return r["ratio"] <= val if op == "<=" else r["ratio"] >= val


def draw(rows, path, quick=False):
    import matplotlib
    matplotlib.use("Agg")               # no display needed
    import matplotlib.pyplot as plt

    ratios = [r for r in rows if r.get("ratio")]
    scaling = [r for r in rows if r.get("procs")]
    fig, axes = plt.subplots(1, 2 if scaling else 1, squeeze=False,
                             figsize=(15 if scaling else 10, max(4, 0.3 * len(ratios) + 1.5)))
    ax = axes[0][0]
    labels = ["%s (vs %s)" % (r["name"], r.get("peer", "-")) for r in ratios]
    colors = []
    for r in ratios:
        colors.append("tab:gray" if r.get("target") is None else
                      "tab:green" if _met(r) else "tab:red")
    ys = range(len(ratios))
    ax.barh(list(ys), [r["ratio"] for r in ratios], color=colors)
    for y, r in zip(ys, ratios):
        if r.get("target") is not None:
            ax.plot([r["target"][1]] * 2, [y - 0.4, y + 0.4], color="black", linewidth=2)
    ax.axvline(1.0, color="black", linewidth=0.5, linestyle=":")
    ax.set_xscale("log")
    ax.set_yticks(list(ys))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ratio, ours / peer (time rows: lower is better; ops/s rows: higher); "
                  "black tick: target")
    ax.set_title("fayt-portals against its peers%s" % (" (quick smoke run)" if quick else ""))
    if scaling:
        ax = axes[0][1]
        procs = sorted({r["procs"] for r in scaling})
        ours = {r["procs"]: r["ours"] for r in scaling}
        ax.plot(procs, [ours[k] for k in procs], marker="o", label="share-point lock")
        for peer in sorted({r["peer"] for r in scaling}):
            vals = {r["procs"]: r["peer_value"] for r in scaling if r["peer"] == peer}
            ax.plot(procs, [vals[k] for k in procs], marker="o", label=peer)
        ax.set_xticks(procs)
        ax.set_xlabel("processes")
        ax.set_ylabel("increments per second, all processes")
        ax.set_title("locked counter: throughput against processes")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
