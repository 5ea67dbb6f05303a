"""Pictures people would rather look at than numbers: per-rank timelines of simulated (or measured) iterations.

matplotlib is imported lazily (Agg backend) so that nothing else in the package pays for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeweaver.plan.ir import Compute, Plan

_MODULE_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")


@dataclass(frozen=True, slots=True)
class Timeline:
    """One panel: a plan and each rank's (start_ms, end_ms) per action (aligned with the plan's actions)."""

    title: str
    plan: Plan
    timings: Sequence[Sequence[tuple[float, float]]]


def write_timeline_png(panels: Sequence[Timeline], path: str | Path, *, width_in: float = 14.0) -> Path:
    """Stack one Gantt chart per panel (rank rows, colour per module, light = forward, dark = backward).

    Gaps between bars are bubbles. All panels share the time axis so their lengths compare directly.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    modules: list[str] = []
    for panel in panels:
        for p in panel.plan.header.placement.pipelines:
            for m in p.modules if len(p.modules) == 1 else (p.name,):
                if m not in modules:
                    modules.append(m)
    colour = {m: _MODULE_COLOURS[i % len(_MODULE_COLOURS)] for i, m in enumerate(modules)}
    horizon = max((end for panel in panels for rank in panel.timings for _, end in rank), default=1.0)
    heights = [max(1.0, 0.35 * panel.plan.header.placement.pp + 0.8) for panel in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(width_in, sum(heights)), squeeze=False, gridspec_kw={"height_ratios": heights}
    )
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        pp = panel.plan.header.placement.pp
        for r, rank_plan in enumerate(panel.plan.ranks):
            for action, (start, end) in zip(rank_plan.actions, panel.timings[r], strict=False):
                if not isinstance(action, Compute) or end <= start:
                    continue
                info = panel.plan.header.placement.pipeline(action.stage.pipeline)
                key = info.modules[0] if len(info.modules) == 1 else info.name
                backward = action.stage.pass_.is_backward
                ax.barh(
                    r,
                    end - start,
                    left=start,
                    height=0.8,
                    color=colour[key],
                    alpha=0.95 if backward else 0.55,
                    edgecolor="white",
                    linewidth=0.2,
                )
        makespan = max((end for rank in panel.timings for _, end in rank), default=0.0)
        ax.set_title(f"{panel.title}: {makespan / 1e3:.2f} s", fontsize=10, loc="left")
        ax.set_yticks(range(pp), [f"rank {r}" for r in range(pp)], fontsize=8)
        ax.set_ylim(pp - 0.5, -0.5)
        ax.set_xlim(0, horizon * 1.01)
        ax.set_xlabel("time (ms)", fontsize=8)
    handles = [Patch(color=colour[m], alpha=0.55, label=f"{m} forward") for m in modules]
    handles += [Patch(color=colour[m], alpha=0.95, label=f"{m} backward") for m in modules]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
