"""Does calibrating SEMU from in-situ stage times (one traced iteration) bring its per-iteration error near 2.4%?

    NUMBA_CACHE_DIR=.cache/numba .venv/bin/python benchmarks/gpu/semu_insitu.py \\
        benchmarks/results/e2e_compare_run{17,18_t2v,19_t2v,20_t2v,21,22_t2v}_h200x4.json \\
        --out benchmarks/results/semu_insitu.json

SEMU is calibrated from an isolated per-layer profile (`profile_layers`); in the pipeline, stage times differ (the
VLM decoder's forward at 1.6-1.9x, docs/gpu.md section 6). Here SEMU's per-(module, pass) stage scales
(`Planner(..., stage_scales=...)`, `CostModel.stage_scales`) are fitted on the traced iteration of ONE run (what a
deployment gets from its first traced iteration), absolute (no makespan level), as sum of measured / sum of
calibrated compute time over the computes of chunks holding one module only (a mixed chunk cannot be split):

- ``FB``: one factor per (module, F/B), from PipeWeaver's trace of the run;
- ``FB+build``: as ``FB``, but F from the chunks that do not start their module, plus section 12's input-building
  term (`CostModel.input_build_ms`, `calibration.fit_input_build_ms`) per module for the forwards of the chunk that
  starts it (one extra parameter per module: the first chunk's forwards are where the executor builds inputs);
- ``FB (2 traces)``, ``FB+build (2 traces)``: the same from the run's two traces (PipeWeaver's and
  interleaved-1f1b's) pooled, where the run has both.

Each fit is scored on every iteration of every schedule our executor ran, in the fit run (the traced iteration of
the traced schedules left out) and in the other runs of the same workload (held out; their own profile's factors,
the fitted scales on top), by MAPE and mean signed error against the measured first-run times (``ms``) and the
repeated ones (``repeat_ms``), beside SEMU calibrated as the run recorded it and as recomputed here. Our
baselines' plans are rebuilt exactly; PipeWeaver's plans were not kept, so every PipeWeaver iteration is planned
again as `semu_residuals.py` does (`_Run.plan`, 30 rollouts, the run's profile): not the plans that ran.

Per trace (`traces`):

- ``scatter``: per (module, pass) and per (module, chunk, pass), the per-compute ratio measured / calibrated:
  its duration-weighted mean (the fitted scale), its coefficient of variation, and the CV of the measured times
  around scale x prediction; plus the CV left after a per-(module, chunk, pass) scale. Scatter that no per-kind
  factor removes bounds what any per-kind scale can do.
- ``oracle``: the traced plan itself (baselines rebuilt; PipeWeaver's rebuilt from the trace's per-rank compute
  order with the re-searched header, `assemble_plan`, checked against the trace's SEMU makespan), simulated by
  SEMU (a) calibrated, (b) with the FB scales of this trace, (c) with every compute's MEASURED duration in the
  trace (perfect compute costs; transfers and waits still SEMU's): the gap of (c) to the measured makespan is the
  makespan's structure (waits, transfers, host), not compute durations.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from semu_residuals import _Run, _run_key

from pipeweaver.plan.assemble import assemble_plan
from pipeweaver.plan.ir import Compute, Pass, Placement, Plan, Recompute, StageKey
from pipeweaver.search.planner import Planner, SearchConfig
from pipeweaver.simulator.calibration import ForwardTiming, fit_input_build_ms
from pipeweaver.simulator.engine import StageCosts, simulate

OURS = ("pipeweaver", "1f1b", "interleaved-1f1b", "optimus-coarse")
FITS = ("FB", "FB+build", "FB (2 traces)", "FB+build (2 traces)")


# ---- traces ----
class Trace:
    """One traced iteration: per compute of the measured timeline, its duration beside SEMU calibrated's."""

    def __init__(self, path: Path) -> None:
        with gzip.open(path, "rt") as f:
            data = json.load(f)
        self.path = path
        self.schedule = path.name.split("_it")[0]
        self.k = int(path.name.split("_it")[1].split(".")[0])
        self.other: dict[str, Any] = data.get("otherData", {})
        events = data["traceEvents"]
        timeline = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
        self.measured: dict[StageKey, float] = {}
        self.calibrated: dict[StageKey, float] = {}
        self.rank: dict[StageKey, int] = {}
        orders: dict[int, list[tuple[int, StageKey, str]]] = defaultdict(list)
        for e in events:
            if e.get("ph") != "X" or e.get("tid") != 0:
                continue
            a = e["args"]
            key = StageKey(str(a["pipeline"]), int(a["chunk"]), int(a["microbatch"]), int(a["sub_microbatch"]),
                           Pass(a["pass"]))  # fmt: skip
            name, rank = timeline[e["pid"]].rsplit(" rank ", 1)
            if name == "measured":
                self.measured[key] = float(e["dur"]) / 1e3
                self.rank[key] = int(rank)
                orders[int(rank)].append((int(a["step"]), key, str(a.get("recompute", "none"))))
            elif name == "semu_calibrated":
                self.calibrated[key] = float(e["dur"]) / 1e3
        self.orders = [[Compute(k, Recompute(rc)) for _, k, rc in sorted(orders[r])] for r in sorted(orders)]

    @property
    def measured_ms(self) -> float:
        return float(self.other["measured_makespan_ms"])

    def samples(self, placement: Placement) -> list[dict[str, Any]]:
        """Computes of single-module chunks: module, chunk, pass F/B, starts-module, measured and calibrated ms."""
        chunks = {(c.pipeline, c.index): c for c in placement.chunks}
        out = []
        for key, m in self.measured.items():
            c = chunks[(key.pipeline, key.chunk)]
            p = self.calibrated.get(key)
            if len({r.module for r in c.layers}) != 1 or not p:
                continue
            out.append({
                "module": c.layers[0].module,
                "chunk": key.chunk,
                "rank": self.rank[key],
                "pass": "F" if key.pass_ is Pass.F else "B",
                "starts": c.layers[0].start == 0,
                "m": m,
                "p": p,
            })  # fmt: skip
        return out


def _ratio(rows: list[dict[str, Any]]) -> float:
    return sum(r["m"] for r in rows) / sum(r["p"] for r in rows)


def _cv(xs: list[float]) -> float | None:
    return statistics.pstdev(xs) / statistics.fmean(xs) if len(xs) > 1 and statistics.fmean(xs) else None


def fit_scales(samples: list[dict[str, Any]], build: bool) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    """(module, pass) -> scale, and module -> input-building ms (`build` only)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        if build and s["pass"] == "F" and s["starts"]:
            continue
        groups[(s["module"], s["pass"])].append(s)
    scales = {k: _ratio(v) for k, v in groups.items()}
    if not build:
        return scales, {}
    forwards = [ForwardTiming(s["module"], s["starts"], s["m"], s["p"]) for s in samples if s["pass"] == "F"]
    builds = fit_input_build_ms(forwards)
    for s in samples:  # a module whose every forward starts it: its F scale from those forwards, no build term
        if s["pass"] == "F" and (s["module"], "F") not in scales:
            scales[(s["module"], "F")] = _ratio([t for t in samples if t["module"] == s["module"] and t["pass"] == "F"])
    return scales, builds


def scatter(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (module, pass) and per (module, chunk, pass): scale, CV of per-compute ratios, CV of measured around
    scale x predicted; and the residual CV after a per-(module, chunk, pass) scale."""
    out: dict[str, Any] = {}
    by_kind: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    by_chunk: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        by_kind[(s["module"], s["pass"])].append(s)
        by_chunk[(s["module"], s["chunk"], s["pass"])].append(s)
    chunk_scale = {k: _ratio(v) for k, v in by_chunk.items()}

    def resid_cv(rows: list[dict[str, Any]], scale_of: Any) -> float | None:
        # RMS of (measured - scale * predicted) over mean measured.
        res = [r["m"] - scale_of(r) * r["p"] for r in rows]
        mean_m = statistics.fmean(r["m"] for r in rows)
        return (statistics.fmean(x * x for x in res) ** 0.5) / mean_m if len(rows) > 1 else None

    for (module, pass_), rows in sorted(by_kind.items()):
        scale = _ratio(rows)
        out[f"{module}.{pass_}"] = {
            "computes": len(rows),
            "scale": scale,
            "ratio_cv": _cv([r["m"] / r["p"] for r in rows]),
            "resid_cv_kind_scale": resid_cv(rows, lambda r, s=scale: s),
            "resid_cv_chunk_scale": resid_cv(rows, lambda r: chunk_scale[(r["module"], r["chunk"], r["pass"])]),
            "per_chunk": {
                str(c): {
                    "computes": len(v),
                    "scale": chunk_scale[(module, c, pass_)],
                    "ratio_cv": _cv([r["m"] / r["p"] for r in v]),
                }
                for (mm, c, pp), v in sorted(by_chunk.items())
                if mm == module and pp == pass_
            },
        }
    return out


# ---- plans ----
class Workbench:
    """Runs, their (re-)planned plans (cached), and planners with fitted scales."""

    def __init__(self, paths: list[Path]) -> None:
        self.runs = {_run_key(p): _Run(p) for p in paths}
        self._plans: dict[tuple[str, str, int], Plan] = {}

    def plan(self, key: str, name: str, k: int) -> Plan:
        if (key, name, k) not in self._plans:
            self._plans[(key, name, k)] = self.runs[key].plan(name, k)
        return self._plans[(key, name, k)]

    def scaled(
        self, key: str, scales: dict[tuple[str, str], float], build: dict[str, float], profile_of: str | None = None
    ) -> Planner:
        """Run `key`'s planner with the scales; the profile factors of run `profile_of` (default: `key`'s own)."""
        run = self.runs[key]
        factors = self.runs[profile_of or key].plain.cost.factors
        config = SearchConfig(compare_baselines=(), max_evaluations=30, budget_ms=1e9)
        return Planner(run.wl.model, run.wl.parallel, run.wl.hardware, factors=factors,
                       config=config, stage_scales=scales, input_build_ms=build)  # fmt: skip

    def traced_plan(self, key: str, trace: Trace) -> Plan:
        """The plan of the traced iteration: a baseline rebuilt; PipeWeaver's from the trace's compute orders."""
        run = self.runs[key]
        if trace.schedule != "pipeweaver":
            plan = self.plan(key, trace.schedule, trace.k)
        else:
            header = self.plan(key, "pipeweaver", trace.k).header
            prep = run.plain._prepare(run.batch(trace.k), header, Recompute.NONE)
            plan = assemble_plan(header, trace.orders, prep.shapes.tensors, graph=prep.graph)
        ours = [[a.stage for a in r.actions if isinstance(a, Compute)] for r in plan.ranks]
        if ours != [[c.stage for c in o] for o in trace.orders]:
            raise ValueError(f"{trace.path}: rebuilt plan's compute orders differ from the trace's")
        return plan


def predict(planner: Planner, plan: Plan, batch: Any) -> float:
    return float(planner.simulate_plan(plan, batch, plan.recompute_map()).makespan_ms)


def oracle(bench: Workbench, key: str, trace: Trace, scales: dict[tuple[str, str], float]) -> dict[str, Any]:
    run = bench.runs[key]
    plan, batch = bench.traced_plan(key, trace), run.batch(trace.k)
    costs = run.plain.stage_costs(plan.header, batch, plan.recompute_map())
    missing = [s for s in costs.compute_ms if s not in trace.measured and costs.compute_ms[s] > 0]
    measured = {s: trace.measured.get(s, 0.0) for s in costs.compute_ms}
    perfect = StageCosts(compute_ms=measured, act_bytes=costs.act_bytes, static_bytes=costs.static_bytes)
    sim_perfect = simulate(plan, perfect, link=run.plain.link)
    sim_cal = simulate(plan, costs, link=run.plain.link)
    scaled = predict(bench.scaled(key, scales, {}), plan, batch)
    m = trace.measured_ms
    busy = [float(b) for b in sim_perfect.busy_ms]
    row = {r["i"]: r for r in run.data["schedules"][trace.schedule]["rows"]}.get(trace.k, {})
    return {
        "measured_makespan_ms": m,
        "row_ms": row.get("ms"),
        "row_repeat_ms": row.get("repeat_ms"),
        "trace_semu_calibrated_ms": trace.other.get("semu_calibrated_makespan_ms"),
        "rebuilt_semu_calibrated_ms": sim_cal.makespan_ms,
        "semu_fb_scaled_ms": scaled,
        "semu_measured_computes_ms": sim_perfect.makespan_ms,
        "computes_missing_from_trace": len(missing),
        "error_pct": {
            "calibrated": 100 * (sim_cal.makespan_ms - m) / m,
            "fb_scaled": 100 * (scaled - m) / m,
            "measured_computes": 100 * (sim_perfect.makespan_ms - m) / m,
        },
        "measured_compute_busy_ms_per_rank": busy,
        "measured_compute_share_per_rank": [b / m for b in busy],
    }


# ---- scoring ----
def _stats(pairs: list[tuple[float, float]]) -> dict[str, float] | None:
    if not pairs:
        return None
    return {
        "n": len(pairs),
        "mape_pct": 100 * statistics.fmean(abs(p - m) / m for p, m in pairs),
        "signed_pct": 100 * statistics.fmean((p - m) / m for p, m in pairs),
    }


def score(
    bench: Workbench, key: str, planners: dict[str, Planner], skip: set[tuple[str, int]]
) -> dict[str, dict[str, Any]]:
    """Per schedule of run `key`: each predictor's MAPE / signed error vs ms and repeat_ms (positive: over)."""
    run = bench.runs[key]
    recorded = run.data["semu"]["schedules"]
    out: dict[str, dict[str, Any]] = {}
    for name in OURS:
        rows = (run.data["schedules"].get(name) or {}).get("rows") or []
        if not rows:
            continue
        rec = recorded.get(name, {})
        rec_ms = dict(zip(rec.get("iterations", []), rec.get("calibrated_ms", []), strict=True))
        pairs: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            k = int(r["i"])
            if (name, k) in skip:
                continue
            plan, batch = bench.plan(key, name, k), run.batch(k)
            preds = {label: predict(p, plan, batch) for label, p in planners.items()}
            if run.warmup + k in rec_ms:
                preds["recorded calibrated"] = float(rec_ms[run.warmup + k])
            for what in ("ms", "repeat_ms"):
                if r.get(what):
                    for label, p in preds.items():
                        pairs[what][label].append((p, float(r[what])))
        out[name] = {what: {label: _stats(v) for label, v in d.items()} for what, d in pairs.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    bench = Workbench(args.runs)
    result: dict[str, Any] = {"traces": {}, "fits": {}}
    # Traces, scatter, oracle.
    traces: dict[str, list[Trace]] = {}
    for key, run in bench.runs.items():
        tdir = run.path.parent / f"e2e_traces_{key}"
        for path in sorted(tdir.glob("*_it*.trace.json.gz")):
            t = Trace(path)
            if t.schedule not in OURS:
                continue
            traces.setdefault(key, []).append(t)
            placement = bench.plan(key, t.schedule, t.k).header.placement
            samples = t.samples(placement)
            fb, _ = fit_scales(samples, build=False)
            result["traces"][str(path)] = {
                "run": key,
                "schedule": t.schedule,
                "iteration": t.k,
                "fb_scales": {f"{m}.{p}": v for (m, p), v in sorted(fb.items())},
                "scatter": scatter(samples),
                "oracle": oracle(bench, key, t, fb),
            }
            o = result["traces"][str(path)]["oracle"]
            e = o["error_pct"]
            print(
                f"{key:10s} {t.schedule:17s} measured {o['measured_makespan_ms']:7.1f} ms; SEMU error: calibrated "
                f"{e['calibrated']:+6.1f}% (trace {o['trace_semu_calibrated_ms']:.1f}, rebuilt "
                f"{o['rebuilt_semu_calibrated_ms']:.1f}), FB-scaled {e['fb_scaled']:+6.1f}%, measured computes "
                f"{e['measured_computes']:+6.1f}%",
                flush=True,
            )
            for kind, s in result["traces"][str(path)]["scatter"].items():
                print(
                    f"    {kind:16s} n={s['computes']:4d} scale {s['scale']:5.2f} ratio CV {s['ratio_cv'] or 0:5.2f}"
                    f"  resid CV kind {s['resid_cv_kind_scale'] or 0:5.2f} chunk {s['resid_cv_chunk_scale'] or 0:5.2f}"
                )
    # Fits and scores.
    plain_of = {key: run.plain for key, run in bench.runs.items()}
    for key, ts in traces.items():
        run = bench.runs[key]
        pw = [t for t in ts if t.schedule == "pipeweaver"]
        if not pw:
            continue
        by_source = {"": pw, " (2 traces)": ts} if len(ts) > 1 else {"": pw}
        fits: dict[str, tuple[dict[tuple[str, str], float], dict[str, float]]] = {}
        for suffix, used in by_source.items():
            samples = [s for t in used for s in t.samples(bench.plan(key, t.schedule, t.k).header.placement)]
            fits["FB" + suffix] = fit_scales(samples, build=False)
            fits["FB+build" + suffix] = fit_scales(samples, build=True)
        skip = {(t.schedule, t.k) for t in ts}
        entry: dict[str, Any] = {
            "workload": run.workload,
            "traces": [str(t.path) for t in ts],
            "fits": {
                label: {"stage_scales": {f"{m}.{p}": v for (m, p), v in sorted(s.items())}, "input_build_ms": b}
                for label, (s, b) in fits.items()
            },
            "runs": {},
        }
        for other, orun in bench.runs.items():
            if orun.workload != run.workload:
                continue
            planners = {"calibrated": plain_of[other]}
            planners.update({label: bench.scaled(other, s, b) for label, (s, b) in fits.items()})
            # The in-situ times carried over whole: the fit run's profile factors under its scales (each run's own
            # profile fit differs by up to 1.6x per stage kind, while the in-situ times agree within a few %).
            planners["calibrated, fit profile"] = bench.scaled(other, {}, {}, profile_of=key)
            for label in ("FB", "FB+build"):
                s_, b_ = fits[label]
                planners[f"{label}, fit profile"] = bench.scaled(other, s_, b_, profile_of=key)
            entry["runs"][other] = {
                "held_out": other != key,
                "schedules": score(bench, other, planners, skip if other == key else set()),
            }
            for name, d in entry["runs"][other]["schedules"].items():
                for what, labels in d.items():
                    cells = "  ".join(f"{lab} {v['mape_pct']:5.1f}" for lab, v in labels.items() if v)
                    held = "held" if other != key else "same"
                    print(f"fit {key:10s} -> {other:10s} {held} {name:17s} {what:9s} {cells}", flush=True)
        result["fits"][key] = entry
    result["noise_floor"] = noise_floor(bench)
    result["summary"] = summarise(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


def noise_floor(bench: Workbench) -> dict[str, Any]:
    """How well one measurement predicts another of the same iteration: per run and schedule, MAPE of the repeated
    time against the first run (same plan and shapes); per pair of runs of a workload and baseline schedule, MAPE
    of one run's first-run times against the other's (same plans, same batches, another process and machine)."""
    out: dict[str, Any] = {"repeat_vs_first": {}, "cross_run_first": {}}
    rows = {
        key: {n: {int(r["i"]): r for r in (s.get("rows") or [])} for n, s in run.data["schedules"].items()}
        for key, run in bench.runs.items()
    }
    for key, by_name in rows.items():
        for name in OURS:
            pairs = [
                (float(r["repeat_ms"]), float(r["ms"])) for r in by_name.get(name, {}).values() if r.get("repeat_ms")
            ]
            if pairs:
                out["repeat_vs_first"].setdefault(key, {})[name] = _stats(pairs)
    keys = sorted(rows)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if bench.runs[a].workload != bench.runs[b].workload:
                continue
            for name in OURS[1:]:
                ra, rb = rows[a].get(name, {}), rows[b].get(name, {})
                pairs = [(float(ra[k]["ms"]), float(rb[k]["ms"])) for k in sorted(set(ra) & set(rb))]
                if pairs:
                    out["cross_run_first"].setdefault(f"{a} vs {b}", {})[name] = _stats(pairs)
    for what, d in out.items():
        for pair, names in d.items():
            cells = "  ".join(f"{n} {v['mape_pct']:4.1f}" for n, v in names.items())
            print(f"noise floor {what:16s} {pair:22s} {cells}")
    return out


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Per workload, schedule and measure: mean MAPE of each predictor over same-run and held-out scores."""
    acc: dict[tuple[str, str, str, str, str], list[float]] = defaultdict(list)
    for fit in result["fits"].values():
        for r in fit["runs"].values():
            where = "held_out" if r["held_out"] else "same_run"
            for name, d in r["schedules"].items():
                for what, labels in d.items():
                    for label, v in labels.items():
                        if v:
                            acc[(fit["workload"], where, name, what, label)].append(v["mape_pct"])
    out: dict[str, Any] = {}
    for (wl, where, name, what, label), v in sorted(acc.items()):
        out.setdefault(wl, {}).setdefault(where, {}).setdefault(name, {}).setdefault(what, {})[label] = {
            "mean_mape_pct": statistics.fmean(v),
            "scores": len(v),
        }
    for wl, d in out.items():
        for where, names in d.items():
            for name, whats in names.items():
                for what, labels in whats.items():
                    cells = "  ".join(f"{lab} {v['mean_mape_pct']:5.1f}" for lab, v in labels.items())
                    print(f"summary {wl:4s} {where:8s} {name:17s} {what:9s} {cells}")
    return out


if __name__ == "__main__":
    main()
