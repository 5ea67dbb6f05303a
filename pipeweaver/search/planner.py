"""The per-batch planner: sub-microbatching, segment-order search, interleaving, memory tuning, compilation.

`Planner` is created once per job (it runs the offline partitioner and keeps SEMU's cost cache across
iterations); `Planner.plan(batch)` is anytime: it returns the best plan found within the budget, with its
predicted makespan, a lower bound and the baselines' predicted makespans on the same batch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum

import numpy as np

from pipeweaver.plan.assemble import assemble_plan
from pipeweaver.plan.graph import StageGraph, stage_graph
from pipeweaver.plan.ir import Compute, Pass, Plan, PlanHeader, PlanSource, Recompute, StageKey
from pipeweaver.plan.layouts import split_sub_microbatches
from pipeweaver.plan.shapes import TransferShapes
from pipeweaver.plan.validator import validate
from pipeweaver.search.baselines.registry import BASELINES, build_baseline_plan, tensors_dtype_for
from pipeweaver.search.bounds import lower_bound_ms
from pipeweaver.search.fallback import build_fallback_plan, fallback_orders, heuristic_group_order
from pipeweaver.search.interleave import interleave
from pipeweaver.search.mcts import MCTSConfig, SegmentOrderSearch, priorities_from_order
from pipeweaver.search.memory_opt import Candidate, greedy_choice, optimise_rank
from pipeweaver.search.parallel import SearchPool
from pipeweaver.search.partition import JobPartition, partition_job
from pipeweaver.search.problem import Problem, build_problem, overflow, stage_priorities
from pipeweaver.simulator.costmodel import CostModel, EfficiencyFactors, HeaderCosts
from pipeweaver.simulator.engine import LinkModel, SimResult, StageCosts, simulate, transfer_bytes
from pipeweaver.simulator.reuse import StageCostCache
from pipeweaver.spec.batch import BatchMetadata
from pipeweaver.spec.hardware import HardwareSpec
from pipeweaver.spec.model import ModelSpec
from pipeweaver.spec.parallel import ParallelSpec

RecomputeMap = dict[tuple[str, int, int, int], Recompute]
"""Strategy per stage pair (pipeline, chunk, microbatch, sub-microbatch); missing means NONE."""


class SearchLevel(IntEnum):
    """Ablation ladder (paper Table 5): each level adds one part of the search to the previous ones."""

    PARTITION = 1
    """Modality-aware partition + sub-microbatching, run with a static schedule fixed before seeing costs."""
    INTERLEAVE = 2
    """+ greedy dual-queue interleaving on this batch's costs (heuristic segment priorities)."""
    MCTS = 3
    """+ Monte Carlo tree search over segment priorities."""
    MEMORY = 4
    """+ per-rank memory-strategy optimisation (recompute where memory binds)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SearchConfig:
    budget_ms: float = 1000.0
    """Wall-clock budget of the segment-order search per batch."""
    level: SearchLevel = SearchLevel.MEMORY
    seed: int = 0
    mcts: MCTSConfig = field(default_factory=MCTSConfig)
    workers: int = 1
    """Search worker processes; 1 searches in the calling process."""
    max_evaluations: int | None = None
    """Stop the search after this many rollouts instead of at the deadline (deterministic: tests, ablations)."""
    memory_reserve: float = 0.05
    """Fraction of device memory kept free (allocator fragmentation, workspace)."""
    compare_baselines: tuple[str, ...] = tuple(BASELINES)
    """Baselines simulated on the same batch for comparison (empty: none)."""
    validate_plans: bool = True


@dataclass(frozen=True, slots=True)
class PlanResult:
    plan: Plan
    predicted_ms: float
    lower_bound_ms: float
    baseline_ms: dict[str, float]
    search_ms: float
    """Time from the batch's arrival to the compiled plan (baseline comparison excluded)."""
    evaluations: int
    """Interleaver runs (MCTS rollouts) made."""
    cache_hit_rate: float
    bubble_fraction: float
    peak_memory_bytes: tuple[float, ...]
    memory_solve_ms: tuple[float, ...] = ()
    """Solve time of each per-rank memory program that ran (empty when memory never bound)."""
    simulation: SimResult | None = None
    """SEMU's simulation of `plan` (per-action times, busy time and memory per rank)."""

    def speedup_over(self, baseline: str) -> float:
        return self.baseline_ms[baseline] / self.predicted_ms


@dataclass(slots=True)
class _Prepared:
    header: PlanHeader
    graph: StageGraph
    costs: HeaderCosts
    problem: Problem
    shapes: TransferShapes


class Planner:
    """Plans one job's batches. Not thread-safe; one per worker process per job."""

    def __init__(
        self,
        model: ModelSpec,
        parallel: ParallelSpec,
        hardware: HardwareSpec,
        *,
        factors: EfficiencyFactors | None = None,
        config: SearchConfig | None = None,
        sizes: Mapping[str, int] | None = None,
        segments: Mapping[str, int] | None = None,
    ) -> None:
        parallel.check_model(model)
        self.model, self.parallel, self.hardware = model, parallel, hardware
        self.config = config or SearchConfig()
        self.cache = StageCostCache()
        self.cost = CostModel(model, parallel, hardware, factors, cache=self.cache)
        self.partition: JobPartition = partition_job(self.cost, sizes=sizes, segments=segments)
        self.link = LinkModel.from_specs(hardware, parallel)
        self.dtype = tensors_dtype_for(hardware)
        self._costs_for: PlanHeader | None = None
        self._costs_batch: BatchMetadata | None = None
        self._costs_memo: dict[Recompute, HeaderCosts] = {}
        self._search_pool: SearchPool | None = None
        if self.config.workers > 1:
            self._pool()  # spawn and warm the workers now, not inside the first plan's budget

    # ---- building blocks ----
    def header_for(self, batch: BatchMetadata, *, job_id: str, source: PlanSource, schedule: str) -> PlanHeader:
        part = self.partition
        return PlanHeader(
            job_id=job_id,
            iteration=batch.iteration,
            placement=part.placement,
            sub_microbatches=split_sub_microbatches(self.model, part.placement, batch, part.sub_microbatch_size),
            num_microbatches=len(batch.microbatches),
            schedule=schedule,
            source=source,
            dp_replica=batch.dp_replica,
        )

    def _header_costs(self, header: PlanHeader, batch: BatchMetadata, recompute: Recompute) -> HeaderCosts:
        """SEMU's costs of every stage under one strategy, memoised for the most recent (header, batch)."""
        if self._costs_for is not header or self._costs_batch is not batch:
            self._costs_memo = {}
            self._costs_for, self._costs_batch = header, batch
        found = self._costs_memo.get(recompute)
        if found is None:
            found = self.cost.header_costs(header, batch, recompute)
            self._costs_memo[recompute] = found
        return found

    def _mem_caps(self) -> list[float]:
        usable = self.hardware.memory_bytes * (1.0 - self.config.memory_reserve)
        return [max(usable - s, 0.0) for s in self.partition.static_memory_bytes]

    def _prepare(self, batch: BatchMetadata, header: PlanHeader, recompute: Recompute) -> _Prepared:
        graph = stage_graph(header)
        costs = self._header_costs(header, batch, recompute)
        shapes = TransferShapes(self.model, batch, header, dtype=self.dtype)
        delays = {
            (p, s): self.link.transfer_ms(graph.rank[p], graph.rank[s], transfer_bytes(shapes.tensors(p, s)))
            for s in graph.stages
            for p in graph.remote_inputs(s)
        }
        problem = build_problem(
            graph, self.parallel.pp, costs.duration_ms, costs.activation_bytes, delays, self._mem_caps()
        )
        return _Prepared(header, graph, costs, problem, shapes)

    def stage_costs(
        self,
        header: PlanHeader,
        batch: BatchMetadata,
        recompute: Mapping[tuple[str, int, int, int], Recompute] | None = None,
    ) -> StageCosts:
        """SEMU stage costs for any plan header (searched or baseline); `recompute` per (pipeline, chunk, mb, sub)."""
        base = self._header_costs(header, batch, Recompute.NONE)
        if not recompute:
            return StageCosts(
                compute_ms=base.duration_ms,
                act_bytes=base.act_bytes_by_forward(),
                static_bytes=self._static_for(header),
            )
        durations = dict(base.duration_ms)
        acts = base.act_bytes_by_forward()
        by_strategy = {rc: self._header_costs(header, batch, rc) for rc in set(recompute.values())}
        for s in durations:
            rc = recompute.get(_pair(s), Recompute.NONE)
            if rc is not Recompute.NONE:
                durations[s] = by_strategy[rc].duration_ms[s]
        for key, rc in recompute.items():
            if rc is not Recompute.NONE:
                acts[StageKey(key[0], key[1], key[2], key[3], Pass.F)] = by_strategy[rc].activation_bytes[key]
        return StageCosts(compute_ms=durations, act_bytes=acts, static_bytes=self._static_for(header))

    def _static_for(self, header: PlanHeader) -> tuple[float, ...]:
        if header.placement == self.partition.placement:
            return self.partition.static_memory_bytes
        from pipeweaver.simulator.memory import static_memory_bytes

        return tuple(static_memory_bytes(self.model, self.parallel, header.placement))

    def simulate_plan(
        self, plan: Plan, batch: BatchMetadata, recompute: Mapping[tuple[str, int, int, int], Recompute] | None = None
    ) -> SimResult:
        return simulate(plan, self.stage_costs(plan.header, batch, recompute), link=self.link)

    # ---- the search ----
    def _orders_from_positions(self, problem: Problem, position: np.ndarray) -> list[list[int]]:
        seqs: list[list[int]] = [[] for _ in range(problem.pp)]
        for i in sorted(range(problem.n), key=lambda i: (int(problem.rank[i]), int(position[i]))):
            seqs[int(problem.rank[i])].append(i)
        return seqs

    def _strategy_costs(self, prep: _Prepared, batch: BatchMetadata) -> dict[Recompute, HeaderCosts]:
        return {rc: self._header_costs(prep.header, batch, rc) for rc in Recompute}

    def _problem_with(self, prep: _Prepared, per: dict[Recompute, HeaderCosts], choice: RecomputeMap) -> Problem:
        """The same problem with each stage pair's costs under its chosen strategy."""
        p = prep.problem
        dur = p.duration_ms.copy()
        alloc = p.alloc_bytes.copy()
        free = p.free_bytes.copy()
        for i, s in enumerate(p.stages):
            rc = choice.get(_pair(s), Recompute.NONE)
            if rc is Recompute.NONE:
                continue
            dur[i] = per[rc].duration_ms[s]
            act = per[rc].activation_bytes.get(_pair(s), 0.0)
            if alloc[i] > 0:
                alloc[i] = act
            if free[i] > 0:
                free[i] = act
        return replace(p, duration_ms=dur, alloc_bytes=alloc, free_bytes=free)

    def _memory_choice(
        self,
        prep: _Prepared,
        per: dict[Recompute, HeaderCosts],
        priority: np.ndarray,
        time_limit_s: float,
        *,
        exact: bool = True,
    ) -> tuple[RecomputeMap, list[float]]:
        """Level 4: per rank, choose each stage pair's strategy under the memory cap (paper section 5.3).

        The live intervals come from interleaving with the leanest strategy everywhere (most headroom); the
        per-rank 0-1 program then buys back speed wherever memory allows.
        """
        lean = self._problem_with(prep, per, {k: Recompute.FULL for k in prep.costs.activation_bytes})
        _, start, end, _ = interleave(lean, stage_priorities(lean, priority))
        index = {s: i for i, s in enumerate(prep.problem.stages)}
        caps = self._mem_caps()
        choice: RecomputeMap = {}
        solve_ms: list[float] = []
        keys = sorted(prep.costs.activation_bytes)
        for r in range(prep.problem.pp):
            pairs = [k for k in keys if prep.header.placement.rank_of(k[0], k[1]) == r]
            starts: list[float] = []
            ends: list[float] = []
            cands: list[list[Candidate]] = []
            for k in pairs:
                f = StageKey(k[0], k[1], k[2], k[3], Pass.F)
                stages = [
                    f,
                    *(s for s in prep.graph.succs[f] if s.pass_.is_backward and (s.pipeline, s.chunk) == k[:2]),
                ]
                stages += [s.with_pass(Pass.W) for s in stages if s.pass_ is Pass.I and s.with_pass(Pass.W) in index]
                starts.append(float(start[index[f]]))
                ends.append(float(max(end[index[s]] for s in stages)))
                options = sorted(
                    (
                        Candidate(
                            int(rc is Recompute.NONE),
                            int(rc is Recompute.SELECTIVE),
                            int(rc is Recompute.FULL),
                            sum(per[rc].duration_ms[s] for s in stages),
                            per[rc].activation_bytes[k],
                        )
                        for rc in (Recompute.NONE, Recompute.SELECTIVE, Recompute.FULL)
                    ),
                    key=lambda c: (c.latency_ms, c.memory_bytes),
                )
                frontier: list[Candidate] = []
                for c in options:  # keep the Pareto frontier: faster or leaner than everything before it
                    if not frontier or c.memory_bytes < frontier[-1].memory_bytes - 1e-9:
                        frontier.append(c)
                cands.append(frontier)
            if not pairs:
                continue
            if exact:
                result = optimise_rank(cands, starts, ends, caps[r], time_limit_s=time_limit_s)
                picks = result.choice
                if result.solved:
                    solve_ms.append(result.solve_ms)
            else:
                picks = greedy_choice(cands, starts, ends, caps[r])
            for k, options_k, j in zip(pairs, cands, picks, strict=True):
                picked = options_k[j]
                choice[k] = (
                    Recompute.FULL if picked.full else Recompute.SELECTIVE if picked.selective else Recompute.NONE
                )
        return choice, solve_ms

    def plan(self, batch: BatchMetadata, *, job_id: str = "", budget_ms: float | None = None) -> PlanResult:
        """Search a plan for `batch` within `budget_ms` (default: the config's)."""
        t0 = time.perf_counter()
        budget = self.config.budget_ms if budget_ms is None else budget_ms
        deadline = t0 + budget / 1e3
        level = self.config.level
        hits0, misses0 = self.cache.hits, self.cache.misses
        header = self.header_for(batch, job_id=job_id, source=PlanSource.SEARCH, schedule="pipeweaver")
        prep = self._prepare(batch, header, Recompute.NONE)
        bound = lower_bound_ms(prep.problem)
        pipelines = tuple(p.name for p in header.placement.pipelines)
        heuristic = heuristic_group_order(prep.problem, pipelines)
        priority = priorities_from_order(heuristic)
        per = self._strategy_costs(prep, batch)
        evaluations = 0
        solve_ms: list[float] = []
        choice: RecomputeMap = {}

        if level is SearchLevel.PARTITION:
            # A static order fixed before this batch's costs are known, with the fastest uniform strategy that fits.
            index = {s: i for i, s in enumerate(prep.problem.stages)}
            seqs = [[index[c.stage] for c in order] for order in fallback_orders(header, interleave)]
            choice = self._uniform_fit(batch, seqs_plan=seqs, prep=prep)
        else:
            # Levels 2-3 schedule with the leanest strategy everywhere (paper 5.2: most headroom); level 4 buys
            # back speed per stage pair wherever memory allows, and keeps it only if the schedule improves.
            lean_choice: RecomputeMap = {k: Recompute.FULL for k in prep.costs.activation_bytes}
            problem = self._problem_with(prep, per, lean_choice)
            choice = lean_choice
            # Compiling, simulating and validating the winner costs about as much as preparing the problem did.
            reserve_s = 0.05 * budget / 1e3 + (time.perf_counter() - t0)
            if level >= SearchLevel.MEMORY:
                t_mem = time.perf_counter()
                found, _ = self._memory_choice(prep, per, priority, 0.0, exact=False)  # greedy: picks the target
                mixed = self._problem_with(prep, per, found)
                if schedule_score(mixed, priority) < schedule_score(problem, priority):
                    choice, problem = found, mixed
                # The exact re-fit after the search costs about twice the greedy pass.
                reserve_s += 2 * (time.perf_counter() - t_mem)
            heuristic_priority = priority
            if level >= SearchLevel.MCTS and len(problem.groups) > 1:
                target = problem

                def evaluate(group_priority: np.ndarray) -> float:
                    return schedule_score(target, group_priority)

                search_deadline = deadline - reserve_s
                if self.config.workers > 1:
                    best_order, _, evaluations = self._pool().search(
                        problem, heuristic, config=self.config.mcts, seed=self.config.seed, deadline=search_deadline
                    )
                else:
                    search = SegmentOrderSearch(
                        len(problem.groups), heuristic, evaluate, config=self.config.mcts, seed=self.config.seed
                    )
                    search.step()  # at least one expansion, even on a budget spent by the preparation
                    cap = self.config.max_evaluations
                    while (search.evaluations < cap) if cap is not None else (time.perf_counter() < search_deadline):
                        search.step()
                    best_order, evaluations = search.best_order, search.evaluations
                if tuple(best_order) != tuple(heuristic):  # unchanged order: keep the same array (no SEMU re-check)
                    priority = priorities_from_order(best_order)
                if level >= SearchLevel.MEMORY:  # re-fit the strategies to the better order's timeline
                    # Out of budget: the greedy choice, no 0-1 programs (unless the run is deterministic).
                    exact = self.config.max_evaluations is not None or time.perf_counter() < deadline
                    again, more_ms = self._memory_choice(prep, per, priority, self._ilp_limit(deadline), exact=exact)
                    solve_ms += more_ms
                    candidate = self._problem_with(prep, per, again)
                    if schedule_score(candidate, priority) < schedule_score(problem, priority):
                        choice, problem = again, candidate
            seqs = self._orders_from_positions(problem, interleave(problem, stage_priorities(problem, priority))[0])
            in_time = self.config.max_evaluations is not None or time.perf_counter() < deadline
            if priority is not heuristic_priority and in_time:
                # The interleaver models transfers as delays; SEMU also queues them on links. Keep the searched order
                # only if SEMU agrees it beats the heuristic one, so a level never does worse than the one below.
                plain = self._orders_from_positions(
                    problem, interleave(problem, stage_priorities(problem, heuristic_priority))[0]
                )
                if self._simulate_seqs(prep, batch, plain, choice) < self._simulate_seqs(prep, batch, seqs, choice):
                    seqs = plain

        stages = prep.problem.stages
        orders = [[Compute(stages[i], choice.get(_pair(stages[i]), Recompute.NONE)) for i in seq] for seq in seqs]
        plan = assemble_plan(header, orders, prep.shapes.tensors, graph=prep.graph)
        sim = self.simulate_plan(plan, batch, choice)
        if not self._fits(sim):
            plan, sim, choice = self._fit_memory(
                prep, batch, plan, sim, orders, per, choice, None if level is SearchLevel.PARTITION else priority
            )
        plan = _with_header(sim.annotate(plan), lower_bound_ms=bound)
        search_ms = (time.perf_counter() - t0) * 1e3
        if self.config.validate_plans:
            validate(plan, graph=prep.graph)
        baselines = self.baseline_makespans(batch) if self.config.compare_baselines else {}
        plan = _with_header(plan, baseline_makespans_ms=tuple(sorted(baselines.items())))
        lookups = (self.cache.hits - hits0) + (self.cache.misses - misses0)
        return PlanResult(
            plan=plan,
            predicted_ms=sim.makespan_ms,
            lower_bound_ms=bound,
            baseline_ms=baselines,
            search_ms=search_ms,
            evaluations=evaluations,
            cache_hit_rate=(self.cache.hits - hits0) / lookups if lookups else 0.0,
            bubble_fraction=sim.bubble_fraction,
            peak_memory_bytes=tuple(float(x) for x in sim.peak_memory_bytes),
            memory_solve_ms=tuple(solve_ms),
            simulation=sim,
        )

    def _fit_memory(
        self,
        prep: _Prepared,
        batch: BatchMetadata,
        plan: Plan,
        sim: SimResult,
        orders: list[list[Compute]],
        per: dict[Recompute, HeaderCosts],
        choice: RecomputeMap,
        priority: np.ndarray | None,
    ) -> tuple[Plan, SimResult, RecomputeMap]:
        """SEMU says the plan overflows a device (its timeline, with link queueing, differs from the
        interleaver's). Re-interleave the same priorities under tighter caps, first with the chosen strategies,
        then with the leanest; then the static fallback order with the leanest strategies. Keep the first that fits
        SEMU, else the one that overflows least."""
        lean: RecomputeMap = {k: Recompute.FULL for k in prep.costs.activation_bytes}
        tried: list[tuple[Plan, SimResult, RecomputeMap]] = [(plan, sim, recompute_map(orders))]

        def attempt(order_lists: list[list[Compute]], strategies: RecomputeMap) -> bool:
            candidate = assemble_plan(prep.header, order_lists, prep.shapes.tensors, graph=prep.graph)
            result = self.simulate_plan(candidate, batch, strategies)
            tried.append((candidate, result, strategies))
            return self._fits(result)

        stages = prep.problem.stages
        if priority is not None:
            for strategies in (choice, lean):
                base = self._problem_with(prep, per, strategies)
                for factor in (0.9, 0.75, 0.6):
                    tight = replace(base, mem_cap_bytes=base.mem_cap_bytes * factor)
                    seqs = self._orders_from_positions(tight, interleave(tight, stage_priorities(tight, priority))[0])
                    order_lists = [
                        [Compute(stages[i], strategies.get(_pair(stages[i]), Recompute.NONE)) for i in seq]
                        for seq in seqs
                    ]
                    if attempt(order_lists, strategies):
                        return tried[-1]
        static = fallback_orders(prep.header, interleave)
        if attempt([[Compute(c.stage, Recompute.FULL) for c in order] for order in static], lean):
            return tried[-1]
        return min(tried, key=lambda t: float(np.max(t[1].peak_memory_bytes)))

    def _simulate_seqs(
        self, prep: _Prepared, batch: BatchMetadata, seqs: list[list[int]], choice: RecomputeMap
    ) -> float:
        stages = prep.problem.stages
        orders = [[Compute(stages[i], choice.get(_pair(stages[i]), Recompute.NONE)) for i in seq] for seq in seqs]
        plan = assemble_plan(prep.header, orders, prep.shapes.tensors, graph=prep.graph)
        return self.simulate_plan(plan, batch, choice).makespan_ms

    def _pool(self) -> SearchPool:
        if self._search_pool is None or self._search_pool.workers != self.config.workers:
            if self._search_pool is not None:
                self._search_pool.close()
            self._search_pool = SearchPool(self.config.workers)
        return self._search_pool

    def close(self) -> None:
        """Shut the search worker processes down (if any were started)."""
        if self._search_pool is not None:
            self._search_pool.close()
            self._search_pool = None

    def _ilp_limit(self, deadline: float) -> float:
        left = deadline - time.perf_counter()
        return float(min(0.05, max(0.005, left / (4 * self.parallel.pp))))

    def _uniform_fit(self, batch: BatchMetadata, *, seqs_plan: list[list[int]], prep: _Prepared) -> RecomputeMap:
        """The fastest single strategy for every stage whose simulated peak fits every rank (full if none)."""
        stages = prep.problem.stages
        pairs = list(prep.costs.activation_bytes)
        for rc in (Recompute.NONE, Recompute.SELECTIVE, Recompute.FULL):
            choice = {k: rc for k in pairs}
            orders = [[Compute(stages[i], rc) for i in seq] for seq in seqs_plan]
            plan = assemble_plan(prep.header, orders, prep.shapes.tensors, graph=prep.graph)
            if self._fits(self.simulate_plan(plan, batch, choice)):
                return choice
        return {k: Recompute.FULL for k in pairs}

    def _fits(self, sim: SimResult) -> bool:
        return bool(np.all(sim.peak_memory_bytes <= self.hardware.memory_bytes))

    def baseline_makespans(self, batch: BatchMetadata, names: Sequence[str] | None = None) -> dict[str, float]:
        """Each baseline's predicted makespan on `batch` (see `baseline_results`)."""
        return {name: sim.makespan_ms for name, sim in self.baseline_results(batch, names).items()}

    def baseline_results(self, batch: BatchMetadata, names: Sequence[str] | None = None) -> dict[str, SimResult]:
        """Each baseline simulated on `batch`, with the fastest uniform recompute strategy that fits device memory
        (what a Megatron user sets with --recompute-granularity); full recompute if none fits."""
        out: dict[str, SimResult] = {}
        for name in names or self.config.compare_baselines:
            try:
                plan = build_baseline_plan(
                    name, model=self.model, parallel=self.parallel, batch=batch, hardware=self.hardware
                )
            except ValueError:
                continue  # the baseline cannot cut this model (e.g. too few layers for its chunks)
            out[name] = self.baseline_result(plan, batch)
        return out

    def baseline_result(self, plan: Plan, batch: BatchMetadata) -> SimResult:
        """Simulate a baseline plan with the fastest uniform recompute strategy that fits memory."""
        pairs = {
            (s.pipeline, c.index, s.microbatch, s.index)
            for s in plan.header.sub_microbatches
            for c in plan.header.placement.chunks_of(s.pipeline)
        }
        sim = self.simulate_plan(plan, batch)
        if self._fits(sim):
            return sim
        for rc in (Recompute.SELECTIVE, Recompute.FULL):
            sim = self.simulate_plan(plan, batch, {k: rc for k in pairs})
            if self._fits(sim):
                return sim
        return sim

    def fallback_plan(self, batch: BatchMetadata, *, job_id: str = "") -> Plan:
        part = self.partition
        return build_fallback_plan(
            self.model,
            part.placement,
            part.sub_microbatch_size,
            batch,
            job_id=job_id,
            dtype=self.dtype,
            interleaver=interleave,
        )


OVERFLOW_PENALTY = 10.0
"""Score multiplier per unit of relative memory overflow: a schedule that does not fit loses to one that does."""


def schedule_score(problem: Problem, group_priority: np.ndarray) -> float:
    """What the search minimises: the interleaved makespan, penalised when a rank's activations overflow its cap."""
    _, start, end, makespan = interleave(problem, stage_priorities(problem, group_priority))
    return makespan * (1.0 + OVERFLOW_PENALTY * overflow(problem, start, end))


def recompute_map(plan_or_orders: Plan | list[list[Compute]]) -> RecomputeMap:
    """Strategy of every stage pair of a plan (or of per-rank compute orders), read off its forward computes."""
    if isinstance(plan_or_orders, Plan):
        orders = [[a for a in rp.actions if isinstance(a, Compute)] for rp in plan_or_orders.ranks]
    else:
        orders = plan_or_orders
    return {_pair(c.stage): c.recompute for order in orders for c in order if c.stage.pass_ is Pass.F}


def _pair(s: StageKey) -> tuple[str, int, int, int]:
    return (s.pipeline, s.chunk, s.microbatch, s.sub)


def _with_header(plan: Plan, **changes: object) -> Plan:
    return replace(plan, header=replace(plan.header, **changes))  # type: ignore[arg-type]


def warm_kernels() -> None:
    """Compile (or load from the numba cache) the search's kernels on a tiny problem."""
    tiny = Problem(
        stages=(),
        pp=1,
        rank=np.zeros(0, dtype=np.int64),
        duration_ms=np.zeros(0),
        is_forward=np.zeros(0, dtype=np.int64),
        alloc_bytes=np.zeros(0),
        free_bytes=np.zeros(0),
        pred_ptr=np.zeros(1, dtype=np.int64),
        pred_idx=np.zeros(0, dtype=np.int64),
        pred_delay_ms=np.zeros(0),
        succ_ptr=np.zeros(1, dtype=np.int64),
        succ_idx=np.zeros(0, dtype=np.int64),
        group=np.zeros(0, dtype=np.int64),
        intra=np.zeros(0, dtype=np.int64),
        groups=(),
        unit=np.zeros(0, dtype=np.int64),
        mem_cap_bytes=np.ones(1),
    )
    interleave(tiny, np.zeros(0))
