"""Plans out of the process: lossless JSON, a readable text dump, and Chrome/Perfetto trace events.

JSON keeps every field in a stable key order, enums by value and stage keys in their text form (`vit.2F0.1`),
so a plan round-trips exactly and diffs well. The trace shows one process per rank: computes on thread 0,
communication (batches and waits) on thread 1, timed from the plan's predictions or from measured timings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from pipeweaver.plan.graph import backward_passes
from pipeweaver.plan.grid import cell_text
from pipeweaver.plan.ir import (
    Action,
    Chunk,
    CommBatch,
    Compute,
    Direction,
    LayerRange,
    Pass,
    PipelineEdge,
    PipelineInfo,
    Placement,
    Plan,
    PlanHeader,
    PlanSource,
    Prefetch,
    RankPlan,
    Recompute,
    StageKey,
    SubMicrobatch,
    TensorSpec,
    Transfer,
    Wait,
)

FORMAT = "pipeweaver.plan/1"
"""Value of the JSON document's `format` key; bump it when the layout changes incompatibly."""

Json = dict[str, Any]
Timings = Sequence[Sequence[tuple[float, float]]]
"""Per rank, one (start_ms, end_ms) per action."""

# ---- JSON --------------------------------------------------------------------------------------------------


def _tensor_to(t: TensorSpec) -> Json:
    return {"shape": list(t.shape), "dtype": t.dtype}


def _action_to(a: Action) -> Json:
    if isinstance(a, Compute):
        out: Json = {"op": "compute", "stage": str(a.stage), "recompute": a.recompute.value}
        if a.offload:
            out["offload"] = True
        return out
    if isinstance(a, Prefetch):
        return {"op": "prefetch", "stage": str(a.stage)}
    if isinstance(a, CommBatch):
        return {
            "op": "comm",
            "handle": a.handle,
            "transfers": [
                {
                    "direction": t.direction.value,
                    "peer": t.peer,
                    "src": str(t.src),
                    "dst": str(t.dst),
                    "tensors": [_tensor_to(x) for x in t.tensors],
                }
                for t in a.ops
            ],
        }
    return {"op": "wait", "handle": a.handle}


def _header_to(h: PlanHeader) -> Json:
    p = h.placement
    return {
        "job_id": h.job_id,
        "iteration": h.iteration,
        "dp_replica": h.dp_replica,
        "schedule": h.schedule,
        "source": h.source.value,
        "num_microbatches": h.num_microbatches,
        "split_backward": h.split_backward,
        "placement": {
            "pp": p.pp,
            "pipelines": [
                {
                    "name": i.name,
                    "modules": list(i.modules),
                    "backward": i.backward,
                    "weight_grad": i.weight_grad,
                }
                for i in p.pipelines
            ],
            "chunks": [
                {
                    "pipeline": c.pipeline,
                    "index": c.index,
                    "rank": c.rank,
                    "layers": [{"module": r.module, "start": r.start, "stop": r.stop} for r in c.layers],
                }
                for c in p.chunks
            ],
            "edges": [{"src": e.src, "dst": e.dst} for e in p.edges],
        },
        "sub_microbatches": [
            {
                "pipeline": s.pipeline,
                "microbatch": s.microbatch,
                "index": s.index,
                "instances": [{"module": m, "indices": list(idx)} for m, idx in s.instances],
            }
            for s in h.sub_microbatches
        ],
        "predicted_makespan_ms": h.predicted_makespan_ms,
        "lower_bound_ms": h.lower_bound_ms,
        "peak_memory_bytes": list(h.peak_memory_bytes),
        "baseline_makespans_ms": [{"schedule": n, "makespan_ms": ms} for n, ms in h.baseline_makespans_ms],
    }


def plan_to_dict(plan: Plan) -> Json:
    """The JSON-ready form of `plan` (plain dicts, lists, strings and numbers)."""
    return {
        "format": FORMAT,
        "header": _header_to(plan.header),
        "ranks": [
            {
                "rank": rp.rank,
                "actions": [_action_to(a) for a in rp.actions],
                "predicted_ms": [[s, e] for s, e in rp.predicted_ms],
            }
            for rp in plan.ranks
        ],
    }


def plan_to_json(plan: Plan, *, indent: int | None = None) -> str:
    """`plan` as JSON text; `plan_from_json` gives back an equal `Plan`."""
    return json.dumps(plan_to_dict(plan), indent=indent, separators=None if indent else (",", ":"))


def _tensor_from(d: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(shape=tuple(int(x) for x in d["shape"]), dtype=str(d["dtype"]))


def _action_from(d: Mapping[str, Any]) -> Action:
    op = d["op"]
    if op == "compute":
        return Compute(StageKey.parse(d["stage"]), Recompute(d["recompute"]), bool(d.get("offload", False)))
    if op == "prefetch":
        return Prefetch(StageKey.parse(d["stage"]))
    if op == "comm":
        return CommBatch(
            handle=int(d["handle"]),
            ops=tuple(
                Transfer(
                    direction=Direction(t["direction"]),
                    peer=int(t["peer"]),
                    src=StageKey.parse(t["src"]),
                    dst=StageKey.parse(t["dst"]),
                    tensors=tuple(_tensor_from(x) for x in t["tensors"]),
                )
                for t in d["transfers"]
            ),
        )
    if op == "wait":
        return Wait(int(d["handle"]))
    raise ValueError(f"unknown action op {op!r} (expected 'compute', 'comm', 'wait' or 'prefetch')")


def _header_from(d: Mapping[str, Any]) -> PlanHeader:
    p = d["placement"]
    placement = Placement(
        pp=int(p["pp"]),
        pipelines=tuple(
            PipelineInfo(
                name=i["name"],
                modules=tuple(i["modules"]),
                backward=bool(i["backward"]),
                weight_grad=bool(i["weight_grad"]),
            )
            for i in p["pipelines"]
        ),
        chunks=tuple(
            Chunk(
                pipeline=c["pipeline"],
                index=int(c["index"]),
                rank=int(c["rank"]),
                layers=tuple(LayerRange(r["module"], int(r["start"]), int(r["stop"])) for r in c["layers"]),
            )
            for c in p["chunks"]
        ),
        edges=tuple(PipelineEdge(src=e["src"], dst=e["dst"]) for e in p["edges"]),
    )
    return PlanHeader(
        job_id=d["job_id"],
        iteration=int(d["iteration"]),
        placement=placement,
        sub_microbatches=tuple(
            SubMicrobatch(
                pipeline=s["pipeline"],
                microbatch=int(s["microbatch"]),
                index=int(s["index"]),
                instances=tuple((i["module"], tuple(int(x) for x in i["indices"])) for i in s["instances"]),
            )
            for s in d["sub_microbatches"]
        ),
        num_microbatches=int(d["num_microbatches"]),
        schedule=d["schedule"],
        source=PlanSource(d["source"]),
        dp_replica=int(d["dp_replica"]),
        split_backward=bool(d["split_backward"]),
        predicted_makespan_ms=float(d["predicted_makespan_ms"]),
        lower_bound_ms=float(d["lower_bound_ms"]),
        peak_memory_bytes=tuple(float(x) for x in d["peak_memory_bytes"]),
        baseline_makespans_ms=tuple((b["schedule"], float(b["makespan_ms"])) for b in d["baseline_makespans_ms"]),
    )


def plan_from_dict(d: Mapping[str, Any]) -> Plan:
    """Inverse of `plan_to_dict`; raises ValueError naming what is wrong with `d`."""
    if d.get("format") != FORMAT:
        raise ValueError(f"not a plan document: format is {d.get('format')!r}, expected {FORMAT!r}")
    try:
        return Plan(
            header=_header_from(d["header"]),
            ranks=tuple(
                RankPlan(
                    rank=int(rp["rank"]),
                    actions=tuple(_action_from(a) for a in rp["actions"]),
                    predicted_ms=tuple((float(s), float(e)) for s, e in rp["predicted_ms"]),
                )
                for rp in d["ranks"]
            ),
        )
    except KeyError as e:
        raise ValueError(f"plan document lacks the field {e}") from None
    except (TypeError, AttributeError) as e:
        raise ValueError(f"malformed plan document: {e}") from None


def plan_from_json(text: str) -> Plan:
    """Inverse of `plan_to_json`."""
    d = json.loads(text)
    if not isinstance(d, dict):
        raise ValueError(f"a plan document is a JSON object, got {type(d).__name__}")
    return plan_from_dict(d)


# ---- text --------------------------------------------------------------------------------------------------


def plan_to_text(plan: Plan) -> str:
    """A readable dump: the header, the placement, then every rank's actions one per line."""
    h = plan.header
    p = h.placement
    lines = [
        f"plan '{h.job_id}' iteration {h.iteration} dp_replica {h.dp_replica}: schedule {h.schedule} "
        f"({h.source.value}), {h.num_microbatches} microbatches, pp {p.pp}"
        + (", split backward (I/W)" if h.split_backward else ""),
        f"predicted makespan {h.predicted_makespan_ms:.3f} ms, lower bound {h.lower_bound_ms:.3f} ms",
    ]
    if h.peak_memory_bytes:
        lines.append("peak memory GiB per rank: " + " ".join(f"{b / 2**30:.2f}" for b in h.peak_memory_bytes))
    for name, ms in h.baseline_makespans_ms:
        lines.append(f"baseline {name}: {ms:.3f} ms")
    for info in p.pipelines:
        passes = "+".join(["F", *(p.value for p in backward_passes(h, info.name))])
        chunks = ", ".join(
            f"{c.index}@r{c.rank}[" + " ".join(f"{r.module}:{r.start}-{r.stop}" for r in c.layers) + "]"
            for c in p.chunks_of(info.name)
        )
        subs = sum(1 for s in h.sub_microbatches if s.pipeline == info.name)
        lines.append(f"pipeline {info.name} ({'+'.join(info.modules)}, {passes}, {subs} sub-microbatches): {chunks}")
    lines += [f"edge {e.src} -> {e.dst}" for e in p.edges]
    for rp in plan.ranks:
        lines.append(f"rank {rp.rank}: {len(rp.actions)} actions")
        for i, a in enumerate(rp.actions):
            when = ""
            if i < len(rp.predicted_ms):
                start, end = rp.predicted_ms[i]
                when = f"  [{start:.3f}, {end:.3f}) ms"
            lines.append(f"  {i:>4}  {a}{when}")
    return "\n".join(lines)


# ---- Chrome / Perfetto trace -------------------------------------------------------------------------------

# Chrome's reserved colour names; Perfetto colours by event name instead.
_PASS_COLOURS = {
    Pass.F: ("thread_state_running", "good", "rail_load", "cq_build_passed"),
    Pass.B: ("thread_state_iowait", "bad", "rail_animation", "cq_build_failed"),
    Pass.I: ("rail_response", "yellow", "thread_state_runnable", "olive"),
    Pass.W: ("generic_work", "rail_idle", "thread_state_unknown", "startup"),
}
_COMM_COLOUR = "grey"
_COMPUTE_TID = 0
_COMM_TID = 1


def _windows(plan: Plan, timings: Timings | None) -> list[Sequence[tuple[float, float]]]:
    """Each rank's (start_ms, end_ms) per action: `timings`, else the predictions, else one ms per step."""
    if timings is not None:
        if len(timings) != len(plan.ranks):
            raise ValueError(f"timings has {len(timings)} ranks, the plan has {len(plan.ranks)}")
        for rp, t in zip(plan.ranks, timings, strict=True):
            if len(t) != len(rp.actions):
                raise ValueError(f"timings for rank {rp.rank} has {len(t)} windows for {len(rp.actions)} actions")
        return list(timings)
    return [
        rp.predicted_ms
        if len(rp.predicted_ms) == len(rp.actions)
        else [(float(i), i + 1.0) for i in range(len(rp.actions))]
        for rp in plan.ranks
    ]


def _event(rank: int, step: int, action: Action, window: tuple[float, float], colour: Mapping[str, int]) -> Json:
    start, end = window
    event: Json = {
        "name": cell_text(action),
        "ph": "X",
        "pid": rank,
        "ts": start * 1000.0,
        "dur": max(0.0, end - start) * 1000.0,
    }
    if isinstance(action, Compute):
        s = action.stage
        palette = _PASS_COLOURS[s.pass_]
        event.update(
            name=str(s),
            cat=s.pipeline,
            tid=_COMPUTE_TID,
            cname=palette[colour.get(s.pipeline, 0) % len(palette)],
            args={
                "step": step,
                "pipeline": s.pipeline,
                "chunk": s.chunk,
                "microbatch": s.microbatch,
                "sub_microbatch": s.sub,
                "pass": s.pass_.value,
                "recompute": action.recompute.value,
                "offload": action.offload,
            },
        )
    elif isinstance(action, Prefetch):
        event.update(cat="prefetch", tid=_COMM_TID, cname=_COMM_COLOUR, args={"step": step, "for": str(action.stage)})
    elif isinstance(action, CommBatch):
        event.update(
            cat="comm",
            tid=_COMM_TID,
            cname=_COMM_COLOUR,
            args={"step": step, "handle": action.handle, "ops": [str(t) for t in action.ops]},
        )
    else:
        event.update(cat="wait", tid=_COMM_TID, cname=_COMM_COLOUR, args={"step": step, "handle": action.handle})
    return event


def chrome_trace(plan: Plan, timings: Timings | None = None) -> dict[str, Any]:
    """Trace-event JSON for ui.perfetto.dev or chrome://tracing: one process per rank, one event per action.

    Times come from `timings` (per rank, one (start_ms, end_ms) per action) when given, else from each rank's
    `predicted_ms`, else each action gets one millisecond in step order.
    """
    windows = _windows(plan, timings)
    colour = {p.name: i for i, p in enumerate(plan.header.placement.pipelines)}
    events: list[Json] = []
    for rp in plan.ranks:
        r = rp.rank
        events += [
            {"name": "process_name", "ph": "M", "pid": r, "tid": 0, "args": {"name": f"rank {r}"}},
            {"name": "process_sort_index", "ph": "M", "pid": r, "tid": 0, "args": {"sort_index": r}},
            {"name": "thread_name", "ph": "M", "pid": r, "tid": _COMPUTE_TID, "args": {"name": "compute"}},
            {"name": "thread_name", "ph": "M", "pid": r, "tid": _COMM_TID, "args": {"name": "comm"}},
        ]
    for rp, ws in zip(plan.ranks, windows, strict=True):
        events += [_event(rp.rank, i, a, w, colour) for i, (a, w) in enumerate(zip(rp.actions, ws, strict=True))]
    h = plan.header
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "job_id": h.job_id,
            "iteration": h.iteration,
            "schedule": h.schedule,
            "source": h.source.value,
            "predicted_makespan_ms": h.predicted_makespan_ms,
        },
    }


def write_chrome_trace(path: str | os.PathLike[str], plan: Plan, timings: Timings | None = None) -> None:
    """Write `chrome_trace(plan, timings)` to `path` as JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(chrome_trace(plan, timings), f)
