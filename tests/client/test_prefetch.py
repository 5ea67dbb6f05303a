"""PlanPrefetcher against the real planner service: plans one iteration ahead, fork-safe start, fallbacks when the
planner is late, down or restarted, and the issue's test: with the planner stopped mid-run, two gloo ranks keep
training on fallback plans, and no iteration waits longer than the deadline plus the fallback's own time."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from pipeweaver import presets
from pipeweaver.client import (
    JobRegistration,
    PipelineExecutor,
    PlannedBatch,
    PlannerClient,
    PlanPrefetcher,
    RetryPolicy,
)
from pipeweaver.datagen import dynamic_batch
from pipeweaver.plan.ir import PlanSource
from pipeweaver.plan.layouts import modular_placement
from pipeweaver.spec import BatchMetadata, Workload
from tests.server.harness import ServerProcess, start_server

FAST_RETRY = RetryPolicy(attempts=2, initial_backoff_s=0.05, max_backoff_s=0.3)


@pytest.fixture(scope="module")
def planner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("prefetch"), "--budget-ms", "50")
    yield server
    assert server.stop() == 0, server.log()


def _batches(w: Workload, n: int, seed: int = 0, start: int = 0) -> list[BatchMetadata]:
    return [dynamic_batch(w, seed=seed, iteration=k) for k in range(start, start + n)]


class _Loader:
    """An iterable that records whether the client had a channel when iteration started (a DataLoader forks its
    workers there)."""

    def __init__(self, client: PlannerClient, items: list[BatchMetadata]) -> None:
        self.client = client
        self.items = items
        self.connected_at_start: bool | None = None

    def __iter__(self) -> Iterator[BatchMetadata]:
        self.connected_at_start = self.client.connected
        return iter(self.items)


def test_plans_arrive_one_iteration_ahead(planner: ServerProcess) -> None:
    w = presets.tiny_vlm(pp=2)
    with PlannerClient(planner.address) as client:
        job = client.register_job(w.model, w.parallel, w.hardware)
        client.close()  # a fresh client: nothing open until the prefetcher starts the loader
    client = PlannerClient(planner.address)
    loader = _Loader(client, _batches(w, 5, seed=1))
    prefetcher = PlanPrefetcher(client, job, loader, deadline_s=5.0)
    items: list[PlannedBatch[BatchMetadata]] = []
    executors = [PipelineExecutor(w.model, job.placement, r) for r in range(2)]
    for item in prefetcher:
        assert client.connected  # the plan for the next batch is on its way while this one "trains"
        for ex in executors:
            ex.check(item.plan, item.metadata)
        items.append(item)
        time.sleep(0.8)  # an iteration: longer than the 50 ms search and its overhead
    client.close()
    assert loader.connected_at_start is False
    assert [i.metadata.iteration for i in items] == list(range(5))
    assert all(i.origin == "planner" and i.fallback_reason is None for i in items)
    assert all(i.plan.header.source in (PlanSource.SEARCH, PlanSource.CACHE) for i in items)
    assert all(i.wait_ms < 400 for i in items[1:]), [i.wait_ms for i in items]  # planned during the sleep
    assert prefetcher.stats.planned == 5 and prefetcher.stats.fallbacks == 0


def _local_job(w: Workload) -> JobRegistration:
    """A registration as the trainer would remember it, for a planner that never answers."""
    return JobRegistration(
        job_id="job-offline",
        placement=modular_placement(w.model, w.parallel.pp),
        sub_microbatch_size={"vit": 8, "llm": 1},
        segments={"vit": 1, "llm": 1},
        static_memory_bytes=(0.0,) * w.parallel.pp,
        model=w.model,
        parallel=w.parallel,
        hardware=w.hardware,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Train in this process as a gloo rank would: one torch thread (more thrash a loaded 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_a_planner_down_from_the_start_costs_nothing_and_training_runs() -> None:
    w = presets.tiny_vlm(pp=1)
    job = _local_job(w)
    client = PlannerClient(f"127.0.0.1:{_free_port()}", retry=FAST_RETRY)
    prefetcher = PlanPrefetcher(client, job, _batches(w, 3, seed=2), deadline_s=2.0, first_deadline_s=2.0)
    ex = PipelineExecutor(w.model, job.placement, 0)
    losses = []
    for item in prefetcher:
        assert item.origin == "fallback" and item.fallback_reason == "unavailable"
        assert item.wait_ms < 500  # refused at once (connection refused, then backing off), not the 2 s deadline
        stats = ex.run_with_fallback(item.plan, item.metadata, prefetcher.fallback_plan)
        assert stats.source is PlanSource.FALLBACK and not stats.fallback_reason
        losses.append(stats.loss)
    client.close()
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    assert prefetcher.stats.local_fallbacks == {"unavailable": 3}
    assert prefetcher.report(0, 100.0) is None and prefetcher.stats.reports_failed == 1


def test_a_late_plan_is_replaced_by_the_local_fallback(planner: ServerProcess) -> None:
    w = presets.tiny_vlm(pp=2)
    with PlannerClient(planner.address) as client:
        job = client.register_job(w.model, w.parallel, w.hardware, planning_budget_ms=2000)
        # A 1 ms deadline cannot be met: the service answers with its own fallback at best, too late for us.
        prefetcher = PlanPrefetcher(
            client, job, _batches(w, 3, seed=3), deadline_s=0.001, first_deadline_s=0.001, grace_s=0.0
        )
        got = [(i.origin, i.fallback_reason, i.served_fallback) for i in prefetcher]
    for origin, reason, served in got:
        assert (origin, reason) == ("fallback", "deadline") or (origin == "planner" and served), got
    assert prefetcher.stats.fallbacks == 3


def test_the_prefetcher_registers_again_after_a_planner_restart(tmp_path: Path) -> None:
    w = presets.tiny_vlm(pp=1)
    port = _free_port()
    server = start_server(tmp_path, "--port", str(port), "--budget-ms", "30")
    client = PlannerClient(f"127.0.0.1:{port}", retry=FAST_RETRY)
    try:
        job = client.register_job(w.model, w.parallel, w.hardware)
        prefetcher = PlanPrefetcher(client, job, _batches(w, 14, seed=4), deadline_s=1.0, grace_s=0.1)
        seen: list[tuple[int, str, str | None]] = []
        for item in prefetcher:
            seen.append((item.metadata.iteration, item.origin, item.fallback_reason))
            if item.metadata.iteration == 2:
                server.stop()
                server = start_server(tmp_path, "--port", str(port), "--budget-ms", "30")
            time.sleep(0.4)
    finally:
        client.close()
        server.stop()
    assert all(origin == "planner" for _, origin, _ in seen[:3]), seen
    restarted = seen[3:]
    assert any(origin == "fallback" for _, origin, _ in restarted), seen
    assert {reason for _, _, reason in restarted} <= {None, "unavailable", "unregistered", "deadline"}, seen
    assert all(origin == "planner" for _, origin, _ in seen[-3:]), seen  # registered again, plans flow


def test_metadata_must_come_from_the_batch_and_increase() -> None:
    w = presets.tiny_vlm(pp=1)
    job = _local_job(w)
    client = PlannerClient(f"127.0.0.1:{_free_port()}", retry=FAST_RETRY)
    with pytest.raises(TypeError, match="metadata=fn"):
        list(PlanPrefetcher(client, job, [object()]))
    b = _batches(w, 2, seed=5)
    with pytest.raises(ValueError, match="must increase"):
        list(PlanPrefetcher(client, job, [b[1], b[0]]))
    wrapped = [(f"tensors of {x.iteration}", x) for x in b]  # (the user's batch, its metadata)
    items = list(PlanPrefetcher(client, job, wrapped, metadata=lambda pair: pair[1], deadline_s=0.5))
    assert [i.batch for i in items] == wrapped
    client.close()


# ---- the test: the planner stops mid-run, two gloo ranks keep training -----------------------------------

RANKS = 2
ITERATIONS = 8
STOP_AFTER = 2
"""Rank 0 asks for the planner to be stopped after this iteration."""
DEADLINE_S = 0.5
GRACE_S = 0.05
FIRST_DEADLINE_S = 20.0
SLACK_S = 0.25
"""Scheduling noise allowed on a loaded 2-core machine on top of the bound."""


def _rank(rank: int, address: str, job: JobRegistration, init_file: str, flags: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=RANKS, timeout=timedelta(seconds=120)
    )
    w = presets.tiny_vlm(pp=RANKS)
    client = PlannerClient(address, retry=FAST_RETRY)  # created here: after the process (and any workers) exist
    prefetcher = PlanPrefetcher(
        client,
        job,
        _batches(w, ITERATIONS, seed=6),
        rank=rank,
        deadline_s=DEADLINE_S,
        first_deadline_s=FIRST_DEADLINE_S,
        grace_s=GRACE_S,
    )
    ex = PipelineExecutor(w.model, job.placement, rank)
    ex.warm_up()
    records: list[dict[str, Any]] = []
    items = iter(prefetcher)
    for k in range(ITERATIONS):
        t0 = time.monotonic()
        item = next(items)
        got_plan_s = time.monotonic() - t0
        stats = ex.run_with_fallback(item.plan, item.metadata, prefetcher.fallback_plan)
        records.append(
            {
                "iteration": k,
                "origin": item.origin,
                "reason": item.fallback_reason,
                "served_fallback": item.served_fallback,
                "ran": stats.source.value,
                "disagreed": stats.fallback_reason,
                "plan_s": got_plan_s,
                "fallback_ms": item.fallback_ms,
                "loss": stats.loss,
            }
        )
        if k == STOP_AFTER and rank == 0:
            Path(flags, "stop").touch()
            while not Path(flags, "stopped").exists():  # outside the timed part: the planner is going away
                time.sleep(0.02)
        dist.barrier()
    client.close()
    local = dict(prefetcher.stats.local_fallbacks)
    Path(flags, f"rank-{rank}.json").write_text(json.dumps({"records": records, "local_fallbacks": local}))
    dist.destroy_process_group()


def test_training_continues_on_fallbacks_when_the_planner_stops_mid_run(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--budget-ms", "50")
    w = presets.tiny_vlm(pp=RANKS)
    procs: list[Any] = []
    try:
        with PlannerClient(server.address) as client:
            job = client.register_job(w.model, w.parallel, w.hardware)
        flags = tmp_path / "flags"
        flags.mkdir()
        ctx = mp.get_context("spawn")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        procs = [
            ctx.Process(target=_rank, args=(r, server.address, job, str(tmp_path / "gloo"), str(flags)))
            for r in range(RANKS)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + 120
        while not (flags / "stop").exists():
            assert all(p.exitcode in (None, 0) for p in procs), [p.exitcode for p in procs]
            assert time.monotonic() < deadline, "rank 0 never asked for the stop"
            time.sleep(0.02)
        assert server.stop() == 0
        (flags / "stopped").touch()
        for p in procs:
            p.join(120)
    finally:
        server.stop()
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * RANKS
    results = [json.loads((flags / f"rank-{r}.json").read_text()) for r in range(RANKS)]
    for r, res in enumerate(results):
        recs = res["records"]
        assert len(recs) == ITERATIONS, r  # every iteration trained
        assert recs[0]["origin"] == "planner"  # the planner was up at first
        after = recs[STOP_AFTER + 2 :]  # the iteration right after the stop may have been planned before it
        assert after and all(x["origin"] == "fallback" and x["ran"] == "fallback" for x in after), recs
        assert all(not x["disagreed"] for x in after), recs  # every rank fell back the same way
        for x in recs:
            allowed = (FIRST_DEADLINE_S if x["iteration"] == 0 else DEADLINE_S) + GRACE_S + x["fallback_ms"] / 1e3
            assert x["plan_s"] <= allowed + SLACK_S, x
        assert all(x["plan_s"] <= DEADLINE_S + GRACE_S + SLACK_S for x in after), recs
        assert sum(res["local_fallbacks"].values()) >= len(after)
    # Both ranks ran the same kind of plan every iteration, and the last rank (the loss) kept computing a loss.
    assert [x["ran"] for x in results[0]["records"]] == [x["ran"] for x in results[1]["records"]]
    assert all(x["loss"] > 0 for x in results[-1]["records"])


def test_lookahead_sends_metadata_further_ahead(planner: ServerProcess) -> None:
    w = presets.tiny_vlm(pp=2)
    with PlannerClient(planner.address) as client:
        job = client.register_job(w.model, w.parallel, w.hardware)
    with pytest.raises(ValueError, match="lookahead must be an integer >= 1"):
        PlanPrefetcher(PlannerClient(planner.address), job, [], lookahead=0)
    client = PlannerClient(planner.address)
    batches = _batches(w, 5, seed=3, start=100)  # the module's planner has seen iterations 0.. of this job
    pulled: list[int] = []

    def loader() -> Iterator[BatchMetadata]:
        for b in batches:
            pulled.append(b.iteration)
            yield b

    prefetcher = PlanPrefetcher(client, job, loader(), deadline_s=5.0, lookahead=2)
    items: list[PlannedBatch[BatchMetadata]] = []
    for item in prefetcher:
        # While iteration k trains, k+1 and k+2 are with the planner already.
        assert len(pulled) == min(item.metadata.iteration - 100 + 3, len(batches))
        items.append(item)
        time.sleep(0.3)
    client.close()
    assert [i.metadata.iteration for i in items] == list(range(100, 105))
    assert all(i.origin == "planner" for i in items)
    assert prefetcher.stats.planned == 5


def test_plans_that_arrived_early_are_checked_before_their_iteration(planner: ServerProcess) -> None:
    w = presets.tiny_vlm(pp=2)
    with PlannerClient(planner.address) as client:
        job = client.register_job(w.model, w.parallel, w.hardware)
    client = PlannerClient(planner.address)
    ex = PipelineExecutor(w.model, job.placement, 0)
    prepared: list[tuple[int, int]] = []

    def prepare(plan: Any, batch: BatchMetadata) -> None:
        prepared.append((batch.iteration, id(plan)))
        ex.prepare(plan, batch)

    wired = PlanPrefetcher(client, job, [], deadline_s=5.0)
    wired.attach(ex)  # what a training loop does
    assert ex.idle_hook == wired.prepare_arrived and wired.prepare == ex.prepare
    ex.idle_hook = None
    batches = _batches(w, 4, seed=4, start=200)
    prefetcher = PlanPrefetcher(client, job, batches, deadline_s=5.0, lookahead=2, prepare=prepare)
    items: list[PlannedBatch[BatchMetadata]] = []
    for item in prefetcher:
        items.append(item)
        k = item.metadata.iteration
        if k < 203:
            deadline = time.monotonic() + 20.0  # "training": until the next iteration's plan is here
            while time.monotonic() < deadline:
                prefetcher.prepare_arrived()
                if k + 1 in dict(prepared):
                    break
                time.sleep(0.05)
            assert k + 1 in dict(prepared), prepared
    client.close()
    assert [i.metadata.iteration for i in items] == list(range(200, 204))
    assert all(i.origin == "planner" for i in items)
    # Every plan after the first was handed out as the very object checked ahead, with no wait for it.
    early = dict(prepared)
    assert sorted(early) == [201, 202, 203]
    for item in items[1:]:
        assert early[item.metadata.iteration] == id(item.plan)
        assert item.wait_ms < 50.0
        assert ex.check(item.plan, item.metadata) is ex._checked[id(item.plan)].graph
    assert prefetcher.stats.planned == 4
