"""Does a host lane per rank explain the measured e2e iterations? SEMU's device times behind a fitted host lane.

    NUMBA_CACHE_DIR=.cache/numba .venv/bin/python benchmarks/gpu/semu_host_lane.py \\
        benchmarks/results/e2e_compare_run{17,18_t2v,19_t2v,20_t2v,21,22_t2v}_h200x4.json \\
        --fit-run run19_t2v --fit-run run17 --out benchmarks/results/semu_host_lane.json

The two-lane model, per rank (offline, SEMU unchanged):

- **host lane**: issues the rank's actions in plan order, back to back; action a costs h(a) host ms, linear in
  its features: a forward compute c_F + c_FL * layers + c_build * (modules whose first layer the chunk holds: the
  executor builds the sub-microbatch's inputs there), a backward (B/I/W) c_B + c_BL * layers, a CommBatch
  c_post + c_op * ops, a Wait c_wait; after the last action the rank's fixed per-iteration host work c_tail
  (warm-up, gradient all-reduce, optimizer step).
- **device lane**: a compute starts at max(its issue start on the host, the device free) and ends at
  max(start + d(a), its issue end on the host) (kernels stream as the host launches them: the device cannot finish
  an action before the host has launched all of it); d(a) is calibrated SEMU's stage time
  (`Planner.stage_costs` with the run's profile factors). A CommBatch is ready on this side at max(its issue end,
  the device free) (NCCL's stream waits for the compute stream); a transfer ends latency + bytes / bandwidth
  (SEMU's link model) after both sides are ready; a Wait moves the device free time to its batch's transfers' end.
- the iteration ends when every rank's device lane and host lane have ended.

Fit (per workload, on ONE run, `--fit-run`): non-negative least squares over two kinds of equations, both in ms
per action: (1) every action of the fit run's traces (`e2e_traces_<run>/*_it3.trace.json.gz`, CUDA events around
each action) whose start and the next action's start the device reached idle, i.e. waiting for the host (the gap
from the previous action's end marker > `CLEAN_GAP_MS`): there the distance between the two start markers is the
host time of the action; (2) every (schedule, iteration, rank) row of the fit run: the host time from the
iteration's start until every action was issued (`host_ms_per_rank.dispatch`) = sum of h over the rank's actions +
c_tail, divided by the rank's action count.

Scored on every iteration of every schedule our executor ran in the other runs of the workload, against the
measured first-run time (`ms`) and the repeated one (`repeat_ms`: same plan, shapes seen, idle hook ~0): SEMU alone
(calibrated makespan of the same plan) against the two-lane prediction. Also: the two-lane prediction with each
rank's measured idle hook added after its host lane (an oracle, not a predictor: what a perfect hook model would
add), and how well the host lane predicts the measured dispatch time. Our baselines' plans are rebuilt exactly;
PipeWeaver's are searched again as `semu_residuals.py` does (not the plans that ran). The host-busy section says,
per run and schedule, the measured dispatch / iteration time per rank (rows) and, from the traces, what share of
the traced iteration each rank's device spent computing, waiting on peers, and idle waiting for its host.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from semu_residuals import _Run, _run_key

from pipeweaver.plan.ir import CommBatch, Compute, Direction, Pass, Placement, Plan, Prefetch, Wait
from pipeweaver.simulator.engine import LinkModel, transfer_bytes

FEATURES = ("c_F", "c_FL", "c_build", "c_B", "c_BL", "c_post", "c_op", "c_wait")
CLEAN_GAP_MS = 0.012
"""A gap between an action's end marker and the next one's start marker above this means the device reached the
next marker idle (the host had not enqueued it yet); below it (2-6 us) the marker was already queued."""


@dataclass(slots=True)
class Act:
    kind: str
    """'F', 'B', 'post', 'wait', 'other'."""
    phi: np.ndarray
    d_ms: float = 0.0
    handle: int = -1
    edges: tuple[tuple[str, str, int, float], ...] = ()
    """Per op of a CommBatch: (edge, 'send'/'recv', peer, transfer ms)."""


def _chunk_info(placement: Placement) -> dict[tuple[str, int], tuple[int, int]]:
    """(pipeline, chunk) -> (layers, modules whose first layer it holds)."""
    return {
        (c.pipeline, c.index): (sum(r.stop - r.start for r in c.layers), sum(1 for r in c.layers if r.start == 0))
        for c in placement.chunks
    }


def _phi(kind: str, layers: int = 0, builds: int = 0, ops: int = 0) -> np.ndarray:
    v = np.zeros(len(FEATURES))
    if kind == "F":
        v[0], v[1], v[2] = 1.0, layers, builds
    elif kind == "B":
        v[3], v[4] = 1.0, layers
    elif kind == "post":
        v[5], v[6] = 1.0, ops
    elif kind == "wait":
        v[7] = 1.0
    return v


def plan_actions(plan: Plan, d_ms: dict[Any, float], link: LinkModel) -> list[list[Act]]:
    info = _chunk_info(plan.header.placement)
    out: list[list[Act]] = []
    for rp in plan.ranks:
        acts: list[Act] = []
        for a in rp.actions:
            if isinstance(a, Compute):
                s = a.stage
                layers, builds = info[(s.pipeline, s.chunk)]
                kind = "F" if s.pass_ is Pass.F else "B"
                acts.append(Act(kind, _phi(kind, layers, builds if kind == "F" else 0), float(d_ms[s])))
            elif isinstance(a, CommBatch):
                edges = []
                for op in a.ops:
                    nbytes = link.device_bytes(transfer_bytes(op.tensors))
                    src, dst = (rp.rank, op.peer) if op.direction is Direction.SEND else (op.peer, rp.rank)
                    edges.append(
                        (f"{op.src}->{op.dst}", op.direction.value, op.peer, link.transfer_ms(src, dst, nbytes))
                    )
                acts.append(Act("post", _phi("post", ops=len(a.ops)), handle=a.handle, edges=tuple(edges)))
            elif isinstance(a, Wait):
                acts.append(Act("wait", _phi("wait"), handle=a.handle))
            elif isinstance(a, Prefetch):
                acts.append(Act("other", _phi("other")))
        out.append(acts)
    return out


def two_lane(acts: list[list[Act]], theta: np.ndarray, tail_ms: float, hooks: list[float] | None = None) -> dict:
    """Event pass over every rank's actions: per rank the host lane's end and the device lane's end."""
    pp = len(acts)
    hs: list[np.ndarray] = []
    he: list[np.ndarray] = []
    for r in range(pp):
        h = np.array([float(a.phi @ theta) for a in acts[r]]) if acts[r] else np.zeros(0)
        end = np.cumsum(h)
        hs.append(end - h)
        he.append(end)
    ready: dict[tuple[str, str], float] = {}
    batch_edges: list[dict[int, list[tuple[str, float]]]] = [defaultdict(list) for _ in range(pp)]
    dev = [0.0] * pp
    ptr = [0] * pp
    while any(ptr[r] < len(acts[r]) for r in range(pp)):
        moved = False
        for r in range(pp):
            while ptr[r] < len(acts[r]):
                i = ptr[r]
                a = acts[r][i]
                if a.kind in ("F", "B"):
                    start = max(hs[r][i], dev[r])
                    dev[r] = max(start + a.d_ms, he[r][i])
                elif a.kind == "post":
                    t = max(he[r][i], dev[r])
                    for edge, direction, _peer, x in a.edges:
                        ready[(edge, direction)] = t
                        batch_edges[r][a.handle].append((edge, x))
                elif a.kind == "wait":
                    done = hs[r][i]
                    blocked = False
                    for edge, x in batch_edges[r][a.handle]:
                        s, v = ready.get((edge, "send")), ready.get((edge, "recv"))
                        if s is None or v is None:
                            blocked = True
                            break
                        done = max(done, max(s, v) + x)
                    if blocked:
                        break
                    dev[r] = max(dev[r], done)
                ptr[r] += 1
                moved = True
        if not moved:
            raise RuntimeError("two-lane pass deadlocked: a Wait's peer never posted")
    host_end = [float(he[r][-1]) + tail_ms if len(he[r]) else tail_ms for r in range(pp)]
    end = max(max(dev[r], host_end[r]) for r in range(pp))
    out = {"makespan_ms": end, "device_end_ms": dev, "host_end_ms": host_end}
    if hooks is not None:
        out["makespan_with_hook_ms"] = max(max(dev[r], host_end[r] + hooks[r]) for r in range(pp))
    return out


# ---- traces ----------------------------------------------------------------------------------------------------


def _trace_events(path: Path) -> tuple[dict[str, Any], dict[int, list[dict[str, Any]]]]:
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    by_rank: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e["pid"] < 100:  # the measured timeline (SEMU's are 100+ and 200+)
            by_rank[int(e["pid"])].append(e)
    for evs in by_rank.values():
        evs.sort(key=lambda e: e["args"]["step"])
    return trace.get("otherData", {}), by_rank


def _event_kind(e: dict[str, Any]) -> str:
    if e["tid"] == 0:
        return "F" if e["args"].get("pass") == "F" else "B"
    return "wait" if e["name"].startswith("wait") else "post"


def trace_samples(path: Path, placement: Placement) -> tuple[list[np.ndarray], list[float]]:
    """(features, host ms) of every action the device reached idle at both its start and the next action's."""
    info = _chunk_info(placement)
    _, by_rank = _trace_events(path)
    xs: list[np.ndarray] = []
    ys: list[float] = []
    for evs in by_rank.values():
        s = [e["ts"] / 1e3 for e in evs]
        en = [(e["ts"] + e["dur"]) / 1e3 for e in evs]
        for i in range(1, len(evs) - 1):
            if s[i] - en[i - 1] <= CLEAN_GAP_MS or s[i + 1] - en[i] <= CLEAN_GAP_MS:
                continue
            e, kind = evs[i], _event_kind(evs[i])
            if kind in ("F", "B"):
                layers, builds = info[(str(e["args"]["pipeline"]), int(e["args"]["chunk"]))]
                phi = _phi(kind, layers, builds if kind == "F" else 0)
            elif kind == "post":
                phi = _phi("post", ops=len(e["args"].get("ops") or []))
            else:
                phi = _phi("wait")
            xs.append(phi)
            ys.append(s[i + 1] - s[i])
    return xs, ys


def trace_shares(path: Path) -> dict[str, Any]:
    """Per rank of a traced iteration: device time computing, in waits (peers), idle waiting for the host."""
    other, by_rank = _trace_events(path)
    makespan = max((e["ts"] + e["dur"]) / 1e3 for evs in by_rank.values() for e in evs)
    ranks = []
    for r in sorted(by_rank):
        evs = by_rank[r]
        compute = sum(e["dur"] for e in evs if e["tid"] == 0) / 1e3
        waits = sum(e["dur"] for e in evs if _event_kind(e) == "wait") / 1e3
        posts = sum(e["dur"] for e in evs if _event_kind(e) == "post") / 1e3
        gaps = [(evs[i + 1]["ts"] - evs[i]["ts"] - evs[i]["dur"]) / 1e3 for i in range(len(evs) - 1)]
        idle = sum(g for g in gaps if g > CLEAN_GAP_MS) + evs[0]["ts"] / 1e3
        ranks.append(
            {
                "rank": r,
                "actions": len(evs),
                "compute_pct": 100 * compute / makespan,
                "wait_pct": 100 * waits / makespan,
                "post_pct": 100 * posts / makespan,
                "idle_for_host_pct": 100 * idle / makespan,
                "boundaries_device_idle": sum(1 for g in gaps if g > CLEAN_GAP_MS),
                "boundaries": len(gaps),
            }
        )
    return {
        "measured_ms": makespan,
        "semu_calibrated_ms": other.get("semu_calibrated_makespan_ms"),
        "ranks": ranks,
    }


# ---- fitting and scoring ---------------------------------------------------------------------------------------


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients (active set by dropping negatives; small problems)."""
    free = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while free:
        sol, *_ = np.linalg.lstsq(a[:, free], b, rcond=None)
        if (sol >= 0).all():
            x[:] = 0
            x[free] = sol
            return x
        free.pop(int(np.argmin(sol)))
    return x


def _semu_and_acts(run: _Run, name: str, k: int) -> tuple[float, list[list[Act]]]:
    plan, batch = run.plan(name, k), run.batch(k)
    recompute = plan.recompute_map()
    costs = run.plain.stage_costs(plan.header, batch, recompute)
    semu = float(run.plain.simulate_plan(plan, batch, recompute).makespan_ms)
    return semu, plan_actions(plan, dict(costs.compute_ms), run.plain.link)


def _cached(cache: dict, run: _Run, name: str, k: int) -> tuple[float, list[list[Act]]]:
    key = (run.path.name, name, k)
    if key not in cache:
        cache[key] = _semu_and_acts(run, name, k)
    return cache[key]


def _ours(run: _Run) -> list[str]:
    return [n for n, s in run.data["schedules"].items() if not n.startswith("torch") and s.get("rows")]


def fit(run: _Run, traces: list[Path], cache: dict, use_rows: bool = True) -> dict[str, Any]:
    xs: list[np.ndarray] = []
    ys: list[float] = []
    per_trace = {}
    for t in traces:
        name = t.name.split("_it")[0]
        tx, ty = trace_samples(t, run.placement(name))
        per_trace[t.name] = len(ty)
        xs += tx
        ys += ty
    rows_x: list[np.ndarray] = []
    rows_y: list[float] = []
    for name in _ours(run) if use_rows else []:
        for r in run.data["schedules"][name]["rows"]:
            disp = (r.get("host_ms_per_rank") or {}).get("dispatch")
            if not disp:
                continue
            _, acts = _cached(cache, run, name, int(r["i"]))
            for rank, ms in enumerate(disp):
                n = len(acts[rank])
                rows_x.append(np.append(sum(a.phi for a in acts[rank]) / n, 1.0 / n))
                rows_y.append(float(ms) / n)
    a = np.vstack([np.append(x, 0.0) for x in xs] + rows_x)
    b = np.array(ys + rows_y)
    theta = nnls(a, b)
    resid = a @ theta - b
    ntr = len(ys)
    return {
        "coefficients_ms": dict(zip((*FEATURES, "c_tail"), theta.tolist(), strict=True)),
        "trace_samples": per_trace,
        "dispatch_rows": len(rows_y),
        "rms_residual_ms_per_action": {
            "trace samples": float(np.sqrt(np.mean(resid[:ntr] ** 2))) if ntr else None,
            "dispatch rows": float(np.sqrt(np.mean(resid[ntr:] ** 2))) if len(rows_y) else None,
        },
        "theta": theta,
    }


def _mape(pairs: list[tuple[float, float]]) -> float | None:
    return 100 * statistics.fmean(abs(p - m) / m for p, m in pairs) if pairs else None


def _signed(pairs: list[tuple[float, float]]) -> float | None:
    return 100 * statistics.fmean((m - p) / m for p, m in pairs) if pairs else None


def score(run: _Run, theta: np.ndarray, cache: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    coef, tail = theta[:-1], float(theta[-1])
    for name in _ours(run):
        got: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in run.data["schedules"][name]["rows"]:
            k = int(r["i"])
            semu, acts = _cached(cache, run, name, k)
            host = r.get("host_ms_per_rank") or {}
            hooks = host.get("idle_hook")
            lane = two_lane(acts, coef, tail, hooks)
            ms = float(r["ms"])
            got["semu ms"].append((semu, ms))
            got["two-lane ms"].append((lane["makespan_ms"], ms))
            if hooks:
                got["two-lane + measured hook ms"].append((lane["makespan_with_hook_ms"], ms))
            if r.get("repeat_ms"):
                rep = float(r["repeat_ms"])
                got["semu repeat_ms"].append((semu, rep))
                got["two-lane repeat_ms"].append((lane["makespan_ms"], rep))
            for rank, d in enumerate(host.get("dispatch") or []):
                got["host lane vs dispatch"].append((lane["host_end_ms"][rank], float(d)))
        out[name] = {
            "iterations": len(run.data["schedules"][name]["rows"]),
            "mape_pct": {k: _mape(v) for k, v in got.items()},
            "mean_signed_pct": {k: _signed(v) for k, v in got.items()},
        }
    return out


def host_busy(run: _Run, cache: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    traces_dir = run.path.parent / f"e2e_traces_{_run_key(run.path)}"
    for name in _ours(run):
        frac = defaultdict(list)
        disp = defaultdict(list)
        acts = defaultdict(list)
        for r in run.data["schedules"][name]["rows"]:
            host = r.get("host_ms_per_rank") or {}
            plan_acts = _cached(cache, run, name, int(r["i"]))[1]
            for rank, d in enumerate(host.get("dispatch") or []):
                frac[rank].append(100 * float(d) / float(r["ms"]))
                disp[rank].append(float(d))
                acts[rank].append(len(plan_acts[rank]))
        entry: dict[str, Any] = {
            "dispatch_pct_of_iteration_per_rank": [statistics.fmean(frac[r]) for r in sorted(frac)] or None,
            "dispatch_ms_per_rank": [statistics.fmean(disp[r]) for r in sorted(disp)] or None,
            "actions_per_rank": [statistics.fmean(acts[r]) for r in sorted(acts)] or None,
            "measured_ms": statistics.fmean(float(r["ms"]) for r in run.data["schedules"][name]["rows"]),
        }
        trace = traces_dir / f"{name}_it3.trace.json.gz"
        if trace.exists():
            entry["trace"] = trace_shares(trace)
        out[name] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--fit-run", action="append", required=True, help="run key (e.g. run19_t2v), one per workload")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    runs = {_run_key(p): _Run(p) for p in args.runs}
    cache: dict = {}
    result: dict[str, Any] = {"features": [*FEATURES, "c_tail"], "clean_gap_ms": CLEAN_GAP_MS, "fits": []}
    for key in args.fit_run:
        src = runs[key]
        traces = sorted((src.path.parent / f"e2e_traces_{key}").glob("*_it3.trace.json.gz"))
        for variant, use_rows in (("trace samples + dispatch rows", True), ("trace samples only", False)):
            f = fit(src, traces, cache, use_rows)
            theta = f.pop("theta")
            coefs = ", ".join(f"{n} {v:.3f}" for n, v in f["coefficients_ms"].items())
            print(f"fit on {key} ({src.workload}, {variant}): {coefs}  samples {f['trace_samples']}")
            f |= {"fit_run": key, "variant": variant, "workload": src.workload, "runs": {}}
            f["traces"] = [str(t) for t in traces]
            for rk, run in runs.items():
                if run.workload != src.workload:
                    continue
                s = score(run, theta, cache)
                f["runs"][rk] = {"held_out": rk != key, "schedules": s}
                for name, e in s.items():
                    cells = "  ".join(f"{k} {v:5.1f}" for k, v in e["mape_pct"].items() if v is not None)
                    print(f"  {rk:10s} {'held' if rk != key else 'FIT '} {name:17s} {cells}")
            result["fits"].append(f)
    result["host_busy"] = {rk: host_busy(run, cache) for rk, run in runs.items()}
    for rk, hb in result["host_busy"].items():
        for name, e in hb.items():
            d = e["dispatch_pct_of_iteration_per_rank"]
            line = f"  {rk:10s} {name:17s} dispatch/iteration % per rank {[round(x, 1) for x in d] if d else '-'}"
            if e["actions_per_rank"]:
                line += f" (dispatch ms {[round(x) for x in e['dispatch_ms_per_rank']]}"
                line += f" for actions {[round(x) for x in e['actions_per_rank']]})"
            if "trace" in e:
                tr = e["trace"]["ranks"]
                line += f"  trace compute% {[round(x['compute_pct']) for x in tr]}"
                line += f" wait% {[round(x['wait_pct']) for x in tr]}"
                line += f" idle% {[round(x['idle_for_host_pct'], 1) for x in tr]}"
            print(line)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
