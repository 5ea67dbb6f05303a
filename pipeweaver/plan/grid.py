"""Render a plan as a rank-by-step grid with the offending cells marked, for validation errors.

Rows are ranks, columns are action indices, cells are each action's short text (`vit.2F0.1`, `comm#3`,
`wait#3`). Big plans show only a window of steps around the marked cells, so a message stays readable.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeweaver.plan.ir import Action, CommBatch, Plan

WINDOW = 6
"""Steps shown on each side of a marked cell when the plan is too wide to show whole."""
_FULL_WIDTH = 2 * WINDOW + 5
"""Plans with at most this many steps are shown whole."""
_GAP = "..."
_END = "(end)"


def cell_text(action: Action) -> str:
    """The short text of one action: a compute's stage (and memory strategy), `comm#h` or `wait#h`."""
    return f"comm#{action.handle}" if isinstance(action, CommBatch) else str(action)


def _columns(width: int, steps: Sequence[int], radius: int) -> list[int | None]:
    """Step indices to show, left to right; None stands for a run of hidden steps."""
    if width <= _FULL_WIDTH:
        shown = set(range(width))
    elif not steps:
        shown = set(range(2 * radius + 1))
    else:
        shown = {c for s in steps for c in range(max(0, s - radius), min(width, s + radius + 1))}
    columns: list[int | None] = []
    for c in range(width):
        if c in shown:
            columns.append(c)
        elif columns and columns[-1] is None:
            continue
        else:
            columns.append(None)
    return columns


def render_grid(plan: Plan, marks: Sequence[tuple[int, int]] = (), *, radius: int = WINDOW) -> str:
    """The rank-by-step grid of `plan` with each `(rank, step)` in `marks` shown as `>>cell<<`.

    A mark at step `len(actions)` points just past a rank's last action (where something is missing).
    """
    marked = set(marks)
    rows = [[cell_text(a) for a in rp.actions] for rp in plan.ranks]
    for r, step in marked:
        if 0 <= r < len(rows) and step == len(rows[r]):
            rows[r].append(_END)
    width = max((len(row) for row in rows), default=0)
    columns = _columns(width, sorted({s for _, s in marked}), radius)

    def cell(r: int, c: int | None) -> str:
        if c is None:
            return _GAP
        text = rows[r][c] if c < len(rows[r]) else ""
        return f">>{text}<<" if (r, c) in marked else text

    labels = [f"rank {rp.rank}" for rp in plan.ranks]
    label_width = max((len(label) for label in [*labels, "step"]), default=4)
    table = [[cell(r, c) for c in columns] for r in range(len(rows))]
    header = [_GAP if c is None else str(c) for c in columns]
    widths = [max([len(header[k]), *(len(row[k]) for row in table)]) for k in range(len(columns))]

    def line(label: str, cells: Sequence[str]) -> str:
        return (
            label.ljust(label_width) + " | " + "  ".join(t.ljust(w) for t, w in zip(cells, widths, strict=True))
        ).rstrip()

    out = [line("step", header)]
    for r, row in enumerate(table):
        out.append(line(labels[r], row))
        carets = [("^" * len(t) if (r, c) in marked else "") for t, c in zip(row, columns, strict=True)]
        if any(carets):
            out.append(line("", carets))
    notes = []
    if marked:
        notes.append(">>cell<< and ^ mark the offending action(s)")
    if any(c is None for c in columns):
        shown = [c for c in columns if c is not None]
        notes.append(
            f"'{_GAP}' hides steps: showing {len(shown)} of {width} steps"
            + (f" ({radius} on each side of a marked cell)" if marked else "")
            + "; Plan.text() prints every action"
        )
    if notes:
        out.append("legend: " + "; ".join(notes))
    return "\n".join(out)
