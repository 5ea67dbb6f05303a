"""Draw a measured iteration beside SEMU's prediction of it, from a merged trace of `e2e_compare.py`.

    python benchmarks/gpu/plot_trace.py benchmarks/results/e2e_traces_run10/pipeweaver_it3.trace.json.gz \
        --out docs/img/measured-vs-semu-pipeweaver.png

The trace (Chrome/Perfetto JSON, gzipped) holds one process per rank and timeline: "measured rank r", "semu_calibrated
rank r", "semu_uncalibrated rank r"; thread 0 carries the computes (category = module, args.pass = F/B/I/W).
One panel per timeline asked for, ranks as rows, a colour per module (light forward, dark backward), one shared time
axis so that the panels' lengths compare directly.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Any

COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3")


def load(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    events: list[dict[str, Any]] = data["traceEvents"] if isinstance(data, dict) else data
    return events


def panels(events: list[dict[str, Any]], labels: list[str]) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """label -> rank -> compute events (ts and dur in microseconds), from the process names."""
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    out: dict[str, dict[int, list[dict[str, Any]]]] = {label: {} for label in labels}
    for e in events:
        if e.get("ph") != "X" or e.get("tid") != 0:
            continue
        label, _, rank = names.get(e["pid"], "").rpartition(" rank ")
        if label in out and rank.isdigit():
            out[label].setdefault(int(rank), []).append(e)
    return {k: v for k, v in out.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--out", required=True)
    ap.add_argument("--panels", default="measured,semu_calibrated")
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    found = panels(load(Path(args.trace)), args.panels.split(","))
    if not found:
        raise SystemExit(f"{args.trace}: none of the timelines {args.panels} in it")
    modules = sorted({e["cat"] for ranks in found.values() for evs in ranks.values() for e in evs})
    colour = {m: COLOURS[i % len(COLOURS)] for i, m in enumerate(modules)}
    start = {k: min(e["ts"] for evs in ranks.values() for e in evs) for k, ranks in found.items()}
    end_ms = max(
        (e["ts"] + e["dur"] - start[k]) / 1e3 for k, ranks in found.items() for evs in ranks.values() for e in evs
    )
    fig, axes = plt.subplots(len(found), 1, figsize=(14, 1.2 + 1.1 * sum(len(r) for r in found.values()) / 2))
    axes = [axes] if len(found) == 1 else list(axes)
    for ax, (label, ranks) in zip(axes, found.items(), strict=True):
        span = max((e["ts"] + e["dur"] - start[label]) / 1e3 for evs in ranks.values() for e in evs)
        for rank, evs in sorted(ranks.items()):
            for e in evs:
                backward = e["args"].get("pass") != "F"
                ax.barh(
                    rank,
                    e["dur"] / 1e3,
                    left=(e["ts"] - start[label]) / 1e3,
                    color=colour[e["cat"]],
                    alpha=1.0 if backward else 0.55,
                    edgecolor="white",
                    linewidth=0.3,
                )
        ax.set_yticks(sorted(ranks), [f"rank {r}" for r in sorted(ranks)])
        ax.invert_yaxis()
        ax.set_xlim(0, end_ms * 1.01)
        ax.set_title(f"{label.replace('_', ' ')}: {span:.0f} ms", fontsize=10, loc="left")
    axes[-1].set_xlabel("ms from the iteration's start")
    handles = [Patch(color=colour[m], alpha=a, label=f"{m} {p}") for m in modules for p, a in (("F", 0.55), ("B", 1.0))]
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=8)
    if args.title:
        fig.suptitle(args.title, x=0.01, ha="left", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
