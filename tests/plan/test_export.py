"""Plan export: lossless JSON round trip, a readable text dump, and Chrome/Perfetto trace events."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeweaver.plan.export import (
    chrome_trace,
    plan_from_json,
    plan_to_json,
    plan_to_text,
    write_chrome_trace,
)
from pipeweaver.plan.ir import CommBatch, Compute, Plan, PlanSource
from tests.plan.test_validator import Docs, Layout, build_plan, docs_strategy, layouts, random_orders
from tests.strategies import plans


def decorated(plan: Plan) -> Plan:
    """`plan` with every optional header field set, so the round trip covers them."""
    header = dataclasses.replace(
        plan.header,
        source=PlanSource.SEARCH,
        dp_replica=3,
        predicted_makespan_ms=12.375,
        lower_bound_ms=0.1 + 0.2,
        peak_memory_bytes=tuple(1e9 + r for r in range(len(plan.ranks))),
        baseline_makespans_ms=(("1f1b", 20.5), ("gpipe", 23.0)),
    )
    return dataclasses.replace(plan, header=header)


@settings(max_examples=60, deadline=None)
@given(
    layout=layouts(),
    docs=docs_strategy,
    rng=st.randoms(use_true_random=False),
    timed=st.booleans(),
)
def test_json_round_trip(layout: Layout, docs: Docs, rng: random.Random, timed: bool) -> None:
    plan, _ = build_plan(layout, docs, lambda g, pp: random_orders(g, pp, rng), timed=timed)
    plan = decorated(plan)
    text = plan_to_json(plan)
    back = plan_from_json(text)
    assert back == plan
    assert plan_to_json(back) == text
    assert plan_from_json(plan_to_json(plan, indent=2)) == plan


@settings(max_examples=100, deadline=None)
@given(plan=plans())
def test_json_round_trip_of_arbitrary_well_formed_plans(plan: Plan) -> None:
    assert plan_from_json(plan_to_json(plan)) == plan
    trace = json.loads(json.dumps(chrome_trace(plan)))
    assert sum(e["ph"] == "X" for e in trace["traceEvents"]) == sum(len(rp.actions) for rp in plan.ranks)


def test_json_layout_is_stable_and_readable() -> None:
    plan, _ = build_plan(Layout(sub_size=2, split_backward=True))
    d = json.loads(plan_to_json(plan))
    assert list(d) == ["format", "header", "ranks"]
    assert d["header"]["source"] == "baseline"
    first = d["ranks"][0]["actions"][0]
    assert first == {"op": "compute", "stage": "vit.0F0.0", "recompute": "none"}
    comm = next(a for a in d["ranks"][0]["actions"] if a["op"] == "comm")
    assert list(comm["transfers"][0]) == ["direction", "peer", "src", "dst", "tensors"]
    assert comm["transfers"][0]["direction"] == "send"


def test_malformed_json_is_a_value_error() -> None:
    plan, _ = build_plan(Layout())
    d = json.loads(plan_to_json(plan))
    with pytest.raises(ValueError, match="format"):
        plan_from_json(json.dumps({**d, "format": "other"}))
    del d["header"]["placement"]
    with pytest.raises(ValueError, match="placement"):
        plan_from_json(json.dumps(d))
    with pytest.raises(ValueError, match="JSON object"):
        plan_from_json("[]")


def test_text_lists_every_action() -> None:
    plan, _ = build_plan(Layout(pp=2, sub_size=1), timed=True)
    text = plan_to_text(plan)
    for rp in plan.ranks:
        assert f"rank {rp.rank}: {len(rp.actions)} actions" in text
        for a in rp.actions:
            assert str(a) in text
    assert "pipeline vit" in text and "edge vit -> llm" in text


def test_trace_has_one_event_per_action() -> None:
    plan, _ = build_plan(Layout(pp=3, chunks_per_rank=2, sub_size=1, split_backward=True), timed=True)
    trace = json.loads(json.dumps(chrome_trace(plan)))
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(events) == sum(len(rp.actions) for rp in plan.ranks)
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert names == {r: f"rank {r}" for r in range(3)}
    for rp in plan.ranks:
        mine = [e for e in events if e["pid"] == rp.rank]
        for e, a, (start, end) in zip(mine, rp.actions, rp.predicted_ms, strict=True):
            assert e["ts"] == pytest.approx(start * 1000) and e["dur"] == pytest.approx((end - start) * 1000)
            if isinstance(a, Compute):
                assert (e["name"], e["cat"], e["tid"]) == (str(a.stage), a.stage.pipeline, 0)
                assert e["args"]["pass"] == a.stage.pass_.value
            else:
                assert e["tid"] == 1
                assert e["name"] == (f"comm#{a.handle}" if isinstance(a, CommBatch) else f"wait#{a.handle}")
    colours = {(e["cat"], e["args"]["pass"]): e["cname"] for e in events if e["tid"] == 0}
    assert len(set(colours.values())) == len(colours)  # one colour per (module, pass)


def test_trace_timings_and_fallback(tmp_path: Path) -> None:
    plan, _ = build_plan(Layout())
    untimed = chrome_trace(plan)  # no predictions: one millisecond per step
    first = next(e for e in untimed["traceEvents"] if e["ph"] == "X" and e["pid"] == 0)
    assert (first["ts"], first["dur"]) == (0.0, 1000.0)
    timings = [[(2.0 * i, 2.0 * i + 0.5) for i in range(len(rp.actions))] for rp in plan.ranks]
    path = tmp_path / "trace.json"
    write_chrome_trace(path, plan, timings)
    trace = json.loads(path.read_text())
    last = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == 1][-1]
    assert last["ts"] == pytest.approx(2000.0 * (len(plan.ranks[1].actions) - 1))
    assert last["dur"] == pytest.approx(500.0)
    with pytest.raises(ValueError, match="timings"):
        chrome_trace(plan, timings[:1])
    with pytest.raises(ValueError, match="timings for rank 0"):
        chrome_trace(plan, [timings[0][:-1], timings[1]])
