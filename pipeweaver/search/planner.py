"""The per-batch planner: sub-microbatching, segment-order search, interleaving, memory tuning, compilation.

`Planner` is created once per job (it runs the offline partitioner and keeps SEMU's cost cache across
iterations); `Planner.plan(batch)` is anytime: it returns the best plan found within the budget, with its
predicted makespan, a lower bound and the baselines' predicted makespans on the same batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any

import numpy as np

from pipeweaver.plan.assemble import assemble_plan
from pipeweaver.plan.graph import StageGraph, stage_graph
from pipeweaver.plan.ir import Compute, Pass, Plan, PlanHeader, PlanSource, Recompute, StageKey
from pipeweaver.plan.layouts import RankOrder, split_sub_microbatches
from pipeweaver.plan.offload import place_prefetches
from pipeweaver.plan.shapes import TransferShapes
from pipeweaver.plan.validator import validate
from pipeweaver.search import bounds
from pipeweaver.search.baselines.registry import BASELINES, build_baseline_plan, tensors_dtype_for
from pipeweaver.search.bounds import lower_bound_ms
from pipeweaver.search.fallback import (
    build_fallback_plan,
    fallback_orders,
    heuristic_group_order,
    sized_group_orders,
    stage_work,
)
from pipeweaver.search.interleave import interleave
from pipeweaver.search.interleave_ref import ACTIVE
from pipeweaver.search.mcts import MCTSConfig, SegmentOrderSearch, priorities_from_order
from pipeweaver.search.memory_opt import greedy_choice_arrays, optimise_rank_arrays, warm_memory_kernels
from pipeweaver.search.parallel import SearchPool
from pipeweaver.search.partition import JobPartition, partition_job
from pipeweaver.search.problem import (
    F64,
    I64,
    Policy,
    Problem,
    build_problem,
    overflow,
    reload_stages,
    stage_priorities,
    with_offload,
)
from pipeweaver.simulator.costmodel import CostModel, EfficiencyFactors, HeaderCosts
from pipeweaver.simulator.engine import LinkModel, SimResult, StageCosts, simulate, transfer_bytes
from pipeweaver.simulator.reuse import StageCostCache
from pipeweaver.spec.batch import BatchMetadata
from pipeweaver.spec.hardware import HardwareSpec
from pipeweaver.spec.model import ModelSpec
from pipeweaver.spec.parallel import ParallelSpec

RecomputeMap = dict[tuple[str, int, int, int], Recompute]
"""Strategy per stage pair (pipeline, chunk, microbatch, sub-microbatch); missing means NONE."""

STRATEGIES = (Recompute.NONE, Recompute.SELECTIVE, Recompute.FULL)
"""Strategy codes of the planner's per-pair arrays: index into this tuple (0 keeps everything, 2 the leanest)."""
_FULL = 2
OFFLOAD_STRATEGIES = (Recompute.NONE, Recompute.SELECTIVE)
"""With `SearchConfig.offload`, codes 3 and 4: what these recompute levels keep, copied to host memory after the
forward and prefetched back before the backward (the pair's time is that level's compute; the copies run on the
rank's host link beside it)."""


OFFLOAD_MIN_GAP = 1.0
"""The uniform offload starting points offload a pair when its dependency chain from forward to backward is at
least this many times its two copies."""


def code_recompute(code: int) -> Recompute:
    """The recompute level of a strategy code (offload codes keep their level's activations)."""
    return STRATEGIES[code] if code < len(STRATEGIES) else OFFLOAD_STRATEGIES[code - len(STRATEGIES)]


def code_label(code: int) -> str:
    return STRATEGIES[code].value if code < len(STRATEGIES) else f"offload+{code_recompute(code).value}"


class SearchLevel(IntEnum):
    """Ablation ladder (paper Table 5): each level adds one part of the search to the previous ones."""

    PARTITION = 1
    """Modality-aware partition + sub-microbatching, run with a static schedule fixed before seeing costs."""
    INTERLEAVE = 2
    """+ greedy dual-queue interleaving on this batch's costs (heuristic segment priorities), from the best uniform
    recompute strategy and interleaving `Policy` with the memory gate at the real budget (by SEMU, among those that
    fit)."""
    MCTS = 3
    """+ Monte Carlo tree search over segment priorities."""
    MEMORY = 4
    """+ per-rank memory-strategy optimisation: per stage pair mixes of strategies as starting points too, and a
    re-fit to the searched order's timeline."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SearchConfig:
    budget_ms: float = 1000.0
    """Wall-clock budget of `Planner.plan` per batch up to the validated plan (preparation, search, memory
    programs, compile, SEMU, validation): the segment-order search gets what is left once the work after it is set
    aside, as measured on this planner's recent batches. Once measured, the memory programs of the starting
    points stop (after the likeliest one) when only that reserve is left. At least one search step always runs,
    so a budget below the fixed costs is exceeded by them. The baseline comparison (`compare_baselines`) comes on
    top."""
    level: SearchLevel = SearchLevel.MEMORY
    seed: int = 0
    mcts: MCTSConfig = field(default_factory=MCTSConfig)
    workers: int = 1
    """Search worker processes; 1 searches in the calling process."""
    max_evaluations: int | None = None
    """Stop the search after this many rollouts instead of at the deadline (deterministic: tests, ablations)."""
    memory_reserve: float = 0.05
    """Fraction of device memory the per-rank memory programs keep free (their timeline is a proxy). The
    interleaver's gate uses the real budget (device memory minus static memory, less room for receive buffers:
    `RECEIVE_HEADROOM`); the final check (SEMU) lets a plan use device memory minus static memory."""
    compare_baselines: tuple[str, ...] = tuple(BASELINES)
    """Baselines simulated on the same batch for comparison (empty: none)."""
    validate_plans: bool = True
    offload: bool = False
    """Also let stage pairs offload their activations to host memory (codes `OFFLOAD_STRATEGIES`; experimental)."""
    memory_gap: float = 0.01
    """Per-rank memory programs stop once their choice is proven within this fraction of the optimum (the paper
    accepts 5%; 1% costs the same here, about a millisecond per rank, and gave better plans on t2v-s)."""


@dataclass(frozen=True, slots=True)
class PlanResult:
    plan: Plan
    predicted_ms: float
    lower_bound_ms: float
    baseline_ms: dict[str, float]
    """Predicted makespan of each compared baseline that fits device memory (also in the plan's header)."""
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
    start: str = ""
    """The starting point the search refined (strategies, interleaving policy, memory gate; see
    `Planner._base_candidates`), and the microbatches' order when a sized one won (`sized_group_orders`)."""
    baselines_over_memory: dict[str, float] = field(default_factory=dict)
    """Compared baselines that do not fit device memory even with full recompute: their peak bytes (fullest
    rank). They would not run, so they have no makespan in `baseline_ms`."""

    def speedup_over(self, baseline: str) -> float:
        """Baseline makespan / ours; KeyError for a baseline that does not fit (see `baselines_over_memory`)."""
        return self.baseline_ms[baseline] / self.predicted_ms


def _by_offloading(candidates: Sequence[_Candidate]) -> tuple[list[_Candidate], list[_Candidate]]:
    """`candidates` that owe nothing to offloading, and those that do (a pair on an offload code, or refitted
    from an offloading timeline), each in the given order: the first are those the search has without it."""

    def offloading(c: _Candidate) -> bool:
        return "offload" in c.label or (len(c.codes) > 0 and int(c.codes.max()) >= len(STRATEGIES))

    return [c for c in candidates if not offloading(c)], [c for c in candidates if offloading(c)]


@dataclass(slots=True)
class _Pairs:
    """The stage pairs of one prepared batch as arrays: what the memory pass and `_problem_for` read.

    Built once per batch, so that every memory pass and every strategy change is array arithmetic instead of
    a walk over stage keys (the dict version cost ~90 ms per vlm-s plan).
    """

    keys: list[tuple[str, int, int, int]]
    """(pipeline, chunk, microbatch, sub) of every pair that holds activations, sorted."""
    rank: I64
    forward: I64
    """Stage index of each pair's F."""
    stage_ptr: I64
    stage_idx: I64
    """CSR: each pair's stages (its F, its chunk's backward passes, W after I)."""
    of_stage: I64
    """Pair of each stage; -1 for stages of forward-only pipelines (always NONE)."""
    duration: F64
    """(strategy, stage): each stage's duration under each of `STRATEGIES`."""
    latency: F64
    """(pair, strategy): time of the pair's stages under each strategy."""
    memory: F64
    """(pair, strategy): activation bytes the pair holds under each strategy."""
    workspace: F64
    """(pair, strategy): what the pair's backward allocates on top while it runs, under each strategy."""
    by_rank: list[I64]
    """Pair indexes on each rank."""
    copy_ms: F64 | None = None
    """(pair, strategy): host copy time of each direction under an offload strategy (0 otherwise); None without
    offloading."""
    reload_of: I64 | None = None
    """`problem.reload_stages` of the batch's problem (offloading only)."""
    chain_gap_ms: F64 | None = None
    """Per pair, the longest dependency path from its forward's end to its first backward pass's start (no
    recompute): how long its activations must wait at least, i.e. what offloading could free (offloading only)."""

    def recompute_map(self, codes: I64) -> RecomputeMap:
        return {k: code_recompute(int(c)) for k, c in zip(self.keys, codes, strict=True)}


@dataclass(slots=True)
class _Prepared:
    header: PlanHeader
    graph: StageGraph
    costs: HeaderCosts
    problem: Problem
    shapes: TransferShapes
    receive_bytes: F64
    """Per rank, the most bytes one stage receives from other ranks (what `_budget_bytes` keeps free)."""
    pairs: _Pairs | None = None


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A starting point of the search: strategy codes per pair and the problem (costs, gate, policy) they give."""

    score: float
    """`schedule_score` at the heuristic priorities, against the real budget."""
    codes: I64
    problem: Problem
    label: str
    """How it was made (reported as `PlanResult.start`)."""


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
        order: RankOrder = RankOrder.ROUND_ROBIN,
        stage_scales: Mapping[tuple[str, str], float] | None = None,
        input_build_ms: Mapping[str, float] | None = None,
    ) -> None:
        parallel.check_model(model)
        self.model, self.parallel, self.hardware = model, parallel, hardware
        self.config = config or SearchConfig()
        self.cache = StageCostCache()
        self.cost = CostModel(
            model,
            parallel,
            hardware,
            factors,
            cache=self.cache,
            stage_scales=stage_scales,
            input_build_ms=input_build_ms,
        )
        self.partition: JobPartition = partition_job(self.cost, sizes=sizes, segments=segments, order=order)
        self.link = LinkModel.from_specs(hardware, parallel)
        self.dtype = tensors_dtype_for(hardware)
        self._costs_for: PlanHeader | None = None
        self._costs_batch: BatchMetadata | None = None
        self._costs_memo: dict[Recompute, HeaderCosts] = {}
        self._search_pool: SearchPool | None = None
        self._loose_fallback_misses = 0
        """Fallbacks in a row whose looser variants all overflowed memory (`LOOSE_FALLBACK_MISSES_BEFORE_SKIP`)."""
        self._fallback_rung = 0
        """Index in `LOOSE_FALLBACKS` of the last fallback that fit."""
        self._loose_try_s = 0.0
        """Wall time of this planner's last looser fallback try (build and SEMU check); 0 before the first."""
        self._lean_fallback_s = 0.0
        """Wall time of its last lean fallback build."""
        self._post_rates: list[float] = []
        """Seconds per stage that the recent plans spent after their search (see `_post_search_s`)."""
        self._post_config: SearchConfig | None = None
        self._baseline_memo: tuple[BatchMetadata, dict[str, SimResult | None]] | None = None
        if self.config.workers > 1:
            self._pool()  # spawn and warm the workers now, not inside the first plan's budget

    def set_stage_scales(self, stage_scales: Mapping[tuple[str, str], float]) -> None:
        """New per-(module, pass) cost factors (`CostModel.stage_scales`, the service's online refit), in place: the
        partition stays (it is the job's), the per-batch memos of stage costs and baselines go."""
        self.cost.set_stage_scales(stage_scales)
        self._costs_for, self._costs_batch, self._costs_memo = None, None, {}
        self._baseline_memo = None

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
        # Transfer time of every cross-rank data edge (`graph.remote_inputs`, inlined: one rank lookup per stage).
        delays: dict[tuple[StageKey, StageKey], float] = {}
        receive_bytes = np.zeros(self.parallel.pp, dtype=np.float64)
        rank_of = graph.rank
        for s in graph.stages:
            r = rank_of[s]
            received = 0
            for p in graph.data_preds[s]:
                rp = rank_of[p]
                if rp != r:
                    num_bytes = self.link.device_bytes(transfer_bytes(shapes.tensors(p, s)))
                    received += num_bytes
                    delays[(p, s)] = self.link.transfer_ms(rp, r, num_bytes)
            receive_bytes[r] = max(receive_bytes[r], received)
        problem = build_problem(
            graph, self.parallel.pp, costs.duration_ms, costs.activation_bytes, delays, self._mem_caps()
        )
        return _Prepared(header, graph, costs, problem, shapes, receive_bytes)

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
                workspace_bytes=base.workspace_bytes,
            )
        durations = dict(base.duration_ms)
        acts = base.act_bytes_by_forward()
        workspace = dict(base.workspace_bytes)
        by_strategy = {rc: self._header_costs(header, batch, rc) for rc in set(recompute.values())}
        for s in durations:
            rc = recompute.get(_pair(s), Recompute.NONE)
            if rc is not Recompute.NONE:
                durations[s] = by_strategy[rc].duration_ms[s]
        for key, rc in recompute.items():
            if rc is not Recompute.NONE:
                acts[StageKey(key[0], key[1], key[2], key[3], Pass.F)] = by_strategy[rc].activation_bytes[key]
                workspace[key] = by_strategy[rc].workspace_bytes.get(key, 0.0)
        return StageCosts(
            compute_ms=durations, act_bytes=acts, static_bytes=self._static_for(header), workspace_bytes=workspace
        )

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

    def _pairs(self, prep: _Prepared, batch: BatchMetadata) -> _Pairs:
        """The batch's stage pairs with their costs under every strategy (memoised on `prep`)."""
        if prep.pairs is None:
            self._build_pairs(prep, [self._header_costs(prep.header, batch, rc) for rc in STRATEGIES])
        assert prep.pairs is not None
        return prep.pairs

    def _strategy_costs(self, prep: _Prepared, batch: BatchMetadata) -> dict[Recompute, HeaderCosts]:
        """SEMU's costs of every stage of `prep` under each strategy."""
        return {rc: self._header_costs(prep.header, batch, rc) for rc in STRATEGIES}

    def _problem_with(self, prep: _Prepared, per: Mapping[Recompute, HeaderCosts], choice: RecomputeMap) -> Problem:
        """`_problem_for` with strategies by pair key (missing: NONE); `per` from `_strategy_costs`."""
        if prep.pairs is None:
            self._build_pairs(prep, [per[rc] for rc in STRATEGIES])
        assert prep.pairs is not None
        code = {rc: c for c, rc in enumerate(STRATEGIES)}
        codes = np.array([code[choice.get(k, Recompute.NONE)] for k in prep.pairs.keys], dtype=np.int64)
        return self._problem_for(prep, codes)

    def _build_pairs(self, prep: _Prepared, per: Sequence[HeaderCosts]) -> None:
        stages = prep.problem.stages
        index = {s: i for i, s in enumerate(stages)}
        keys = sorted(prep.costs.activation_bytes)
        key_index = {k: j for j, k in enumerate(keys)}
        of_stage = np.array([key_index.get(_pair(s), -1) for s in stages], dtype=np.int64)
        duration = np.array([[c.duration_ms[s] for s in stages] for c in per], dtype=np.float64).reshape(3, -1)
        levels = [STRATEGIES.index(rc) for rc in OFFLOAD_STRATEGIES] if self.config.offload else []
        duration = np.concatenate((duration, duration[levels]), axis=0)
        ptr = [0]
        idx: list[int] = []
        forward: list[int] = []
        for k in keys:
            f = StageKey(k[0], k[1], k[2], k[3], Pass.F)
            group = [
                f,
                *(s for s in prep.graph.succs[f] if s.pass_.is_backward and (s.pipeline, s.chunk) == k[:2]),
            ]
            group += [s.with_pass(Pass.W) for s in group if s.pass_ is Pass.I and s.with_pass(Pass.W) in index]
            idx.extend(index[s] for s in group)
            ptr.append(len(idx))
            forward.append(index[f])
        stage_ptr = np.array(ptr, dtype=np.int64)
        stage_idx = np.array(idx, dtype=np.int64)
        fwd = np.array(forward, dtype=np.int64)
        # Each pair's time under each strategy: the sum of its stages' durations (reduceat needs >= 1 pair).
        width = duration.shape[0]
        latency = (
            np.add.reduceat(duration[:, stage_idx], stage_ptr[:-1], axis=1).T.copy() if keys else np.zeros((0, width))
        )
        memory = np.array([[c.activation_bytes[k] for c in per] for k in keys], dtype=np.float64).reshape(-1, 3)
        memory = np.concatenate((memory, memory[:, levels]), axis=1)
        workspace = np.array([[c.workspace_bytes.get(k, 0.0) for c in per] for k in keys], dtype=np.float64)
        workspace = np.concatenate((workspace.reshape(-1, 3), workspace.reshape(-1, 3)[:, levels]), axis=1)
        copy_ms: F64 | None = None
        if levels:
            copy_ms = np.zeros_like(memory)
            host = self.link.host_copy_ms
            for c in range(len(STRATEGIES), width):
                copy_ms[:, c] = [host(b) for b in memory[:, c]]
        rank = prep.problem.rank[fwd]
        prep.pairs = _Pairs(
            keys=keys,
            rank=rank,
            forward=fwd,
            stage_ptr=stage_ptr,
            stage_idx=stage_idx,
            of_stage=of_stage,
            duration=duration,
            latency=latency,
            memory=memory,
            workspace=workspace,
            by_rank=[np.flatnonzero(rank == r) for r in range(prep.problem.pp)],
            copy_ms=copy_ms,
            reload_of=reload_stages(prep.problem) if levels else None,
            chain_gap_ms=self._chain_gaps(prep.problem, fwd, stage_ptr, stage_idx, duration[0]) if levels else None,
        )

    @staticmethod
    def _chain_gaps(problem: Problem, fwd: I64, stage_ptr: I64, stage_idx: I64, duration: F64) -> F64:
        if not len(fwd):
            return np.zeros(0)
        has_back = np.diff(stage_ptr) > 1
        first_back = np.where(has_back, stage_idx[np.minimum(stage_ptr[:-1] + 1, len(stage_idx) - 1)], fwd)
        order = bounds._order(problem)
        path = bounds._pair_paths_kernel(
            order, duration, problem.pred_ptr, problem.pred_idx, problem.pred_delay_ms, fwd, first_back
        )
        gap: F64 = np.where(has_back & np.isfinite(path), path - duration[fwd], 0.0)
        return gap

    def _problem_for(self, prep: _Prepared, codes: I64, *, like: Problem | None = None) -> Problem:
        """The problem with each stage pair's costs under its strategy (`codes` index `STRATEGIES`); the memory
        cap and interleaving policy of `like` (default: `prep.problem`'s)."""
        pairs = prep.pairs
        assert pairs is not None
        p = (
            prep.problem
            if like is None
            else replace(prep.problem, mem_cap_bytes=like.mem_cap_bytes, policy=like.policy)
        )
        has_pair = pairs.of_stage >= 0
        safe = np.where(has_pair, pairs.of_stage, 0)
        code = np.where(has_pair, codes[safe], 0) if len(codes) else np.zeros(p.n, dtype=np.int64)
        duration = pairs.duration[code, np.arange(p.n)]
        changed = has_pair & (code != 0)
        act = pairs.memory[safe, code] if len(codes) else np.zeros(p.n)
        # A stage allocates (F) or frees (its last backward pass) the pair's bytes: only those entries change.
        alloc = np.where(changed & (p.alloc_bytes > 0), act, p.alloc_bytes)
        free = np.where(changed & (p.free_bytes > 0), act, p.free_bytes)
        out = replace(p, duration_ms=duration, alloc_bytes=alloc, free_bytes=free)
        if pairs.copy_ms is None:
            return out
        offloads = has_pair & (code >= len(STRATEGIES)) & (p.is_forward == 1)
        copy = pairs.copy_ms[safe, code] if len(codes) else np.zeros(p.n)
        return with_offload(out, np.where(offloads, act, 0.0), np.where(offloads, copy, 0.0), pairs.reload_of)

    def _stage_costs_for(self, prep: _Prepared, codes: I64) -> StageCosts:
        """`stage_costs(prep.header, batch, recompute)` from the pair arrays (the same numbers, no dict walk)."""
        pairs = prep.pairs
        assert pairs is not None
        problem = self._problem_for(prep, codes)
        stages = prep.problem.stages
        rows = np.arange(len(pairs.keys))
        acts = pairs.memory[rows, codes].tolist() if len(codes) else []
        workspace = pairs.workspace[rows, codes].tolist() if len(codes) else []
        return StageCosts(
            compute_ms=dict(zip(stages, problem.duration_ms.tolist(), strict=True)),
            act_bytes={stages[f]: b for f, b in zip(pairs.forward.tolist(), acts, strict=True)},
            static_bytes=self._static_for(prep.header),
            workspace_bytes=dict(zip(pairs.keys, workspace, strict=True)),
        )

    def _memory_choices(
        self, prep: _Prepared, problem: Problem, priority: np.ndarray, time_limit_s: float, *, exact: bool = True
    ) -> tuple[list[I64], list[float]]:
        """Level 4: per rank, choose each stage pair's strategy under the memory cap (paper section 5.3).

        The live intervals come from interleaving `problem` (the schedule being refined: its strategies, cap and
        policy) at `priority`; the per-rank 0-1 program then picks, per stage pair, any strategy (more recompute
        or less than `problem`'s) so that the live activations fit. Its objective (summed latency on a fixed
        timeline) is a proxy for the makespan, so the caller scores every choice returned here on the re-timed
        schedule: the program's (within `memory_gap` of its optimum) for each cap in `MEMORY_CAP_FACTORS`, and
        the greedy warm start. Without `exact`, only the greedy one. Returns strategy codes per pair, and the
        solve time of each rank program that had to be decided.
        """
        pairs = prep.pairs
        assert pairs is not None
        factors = MEMORY_CAP_FACTORS if exact else ()
        # With offloading, the programs are also solved on the recompute strategies alone (the choices without
        # offloading stay among the candidates: the proxy below can mislead).
        widths = (len(STRATEGIES), pairs.latency.shape[1]) if pairs.copy_ms is not None else (len(STRATEGIES),)
        per_width = len(factors) + 1
        choices = [np.zeros(len(pairs.keys), dtype=np.int64) for _ in range(per_width * len(widths))]
        solve_ms: list[float] = []
        if not pairs.keys:
            return choices[:1], solve_ms
        _, start, end, _ = interleave(problem, stage_priorities(problem, priority))
        first = start[pairs.forward]
        last = np.maximum.reduceat(end[pairs.stage_idx], pairs.stage_ptr[:-1])
        caps = self._mem_caps()
        for r, sel in enumerate(pairs.by_rank):
            if not len(sel):
                continue
            lat, mem = pairs.latency[sel], pairs.memory[sel]
            if pairs.copy_ms is not None:
                # An offloaded pair holds its bytes only around its forward and its backward (and while the copies
                # run): the program, which charges a pair's bytes over its whole life, sees them scaled by that
                # share of the life. A proxy, as the program's timeline is; the re-timed score decides.
                # Where the copies do not fit between the forward and the backward on this timeline, the backward
                # waits for them: that much latency more.
                life = np.maximum(last[sel] - first[sel], 1e-9)
                copies = 2.0 * pairs.copy_ms[sel]
                held = (lat + copies) / life[:, None]
                offload = pairs.copy_ms[sel] > 0
                mem = np.where(offload, mem * np.minimum(held, 1.0), mem)
                lat = np.where(offload, lat + np.maximum(0.0, copies - (life[:, None] - lat)), lat)
            for w, width in enumerate(widths):
                mine = choices[w * per_width : (w + 1) * per_width]
                lat_w, mem_w = np.ascontiguousarray(lat[:, :width]), np.ascontiguousarray(mem[:, :width])
                count = np.full(len(sel), width, dtype=np.int64)
                for codes, factor in zip(mine, factors, strict=False):
                    result = optimise_rank_arrays(
                        lat_w,
                        mem_w,
                        count,
                        first[sel],
                        last[sel],
                        caps[r] * factor,
                        time_limit_s=time_limit_s,
                        relative_gap=self.config.memory_gap,
                    )
                    codes[sel] = result.choice
                    if result.solved:
                        solve_ms.append(result.solve_ms)
                mine[-1][sel] = greedy_choice_arrays(lat_w, mem_w, count, first[sel], last[sel], caps[r])
        return choices, solve_ms

    def _refit_memory(
        self,
        prep: _Prepared,
        priority: np.ndarray,
        codes: I64,
        problem: Problem,
        time_limit_s: float,
        exact: bool,
        budget: F64,
    ) -> tuple[I64, Problem, list[float]]:
        """The best of (`codes`, `problem`) and `_memory_choices` on `problem`'s timeline at `priority`, by the
        interleaved score (each choice keeps `problem`'s cap and policy)."""
        choices, solve_ms = self._memory_choices(prep, problem, priority, time_limit_s, exact=exact)
        best = schedule_score(problem, priority, budget)
        for found in choices:
            if np.array_equal(found, codes):
                continue
            candidate = self._problem_for(prep, found, like=problem)
            score = schedule_score(candidate, priority, budget)
            if score < best:
                codes, problem, best = found, candidate, score
        return codes, problem, solve_ms

    def _device_budget_bytes(self) -> F64:
        """Each rank's memory beside its static memory, all of which SEMU's check (`_fits`) lets a plan use."""
        return np.array([self.hardware.memory_bytes - s for s in self.partition.static_memory_bytes], dtype=np.float64)

    def _budget_bytes(self, prep: _Prepared) -> F64:
        """Each rank's activation budget, the interleaver's memory gate: device memory minus static memory minus
        `RECEIVE_HEADROOM` times the rank's largest receive, minus the largest backward working memory on the rank
        (once the pairs are known). SEMU also counts receive buffers, which the interleaver
        does not see: gated without room for them, the best starting points overflowed SEMU's check (by 1.4 GiB on
        t2v-s, seed 0) and the planner fell back to leaner ones."""
        budget = self._device_budget_bytes() - RECEIVE_HEADROOM * prep.receive_bytes
        if prep.pairs is not None and len(prep.pairs.keys):
            # A backward's working memory comes on top of the activations while it runs (SEMU counts it); the
            # gate sees activations only, so it keeps room for the largest on the rank under any strategy. Room
            # for the no-recompute one only (smaller: full recompute rebuilds a block's activations) let more
            # starting points overflow in SEMU: t2v-s, 4 batches at 700 ms, 30.99 s against 30.21 s (scratch).
            most = np.zeros(prep.problem.pp)
            np.maximum.at(most, prep.pairs.rank, prep.pairs.workspace.max(axis=1))
            budget = budget - most
        return budget

    def _base_candidates(
        self,
        prep: _Prepared,
        priority: np.ndarray,
        budget: F64,
        time_limit_s: float,
        *,
        memory: bool,
        refit_until: float = math.inf,
        programs_until: float = math.inf,
    ) -> tuple[list[_Candidate], list[Problem], list[float]]:
        """Starting points for the search, with their interleaved scores at `priority`, best first.

        Every uniform strategy (none, selective, full recompute everywhere) under each interleaving `Policy`, with
        the memory gate at each rank's real budget and at `BASE_CAP_FACTORS` of it. With `memory` (level 4) also
        the per-rank memory programs' mixes (each pair any strategy, more or less recompute than the schedule it
        refines), solved on two kinds of timeline:
        - the gated ones: the leanest uniform schedule (the paper's choice) and the best uniform one of each policy;
        - relaxed ones (`RELAXED_GATES`): no or selective recompute with the gate well above the budget, so the
          program sees where memory must be freed for a schedule that does not stall on it, and adds recompute
          there (uniform schedules stall when memory binds: the gate makes them fit, the program then only removes
          recompute).
        Also returns the uniform problems (none, selective, full: for the lower bound) and the programs' solve
        times.

        The uniform starting points always come. The memory programs then run in the order their mixes most often
        became the plan's starting point (`PROGRAM_POLICIES`: the relaxed timelines, then the refits, earliest
        first), the first always and the others while `time.perf_counter() < programs_until`, so that a short
        budget is spent on the likeliest ones rather than overrun by all of them.
        """
        pairs = prep.pairs
        assert pairs is not None
        n = len(pairs.keys)
        uniform = [self._problem_for(prep, np.full(n, code, dtype=np.int64)) for code in range(pairs.latency.shape[1])]
        found: list[_Candidate] = []
        solve_ms: list[float] = []

        def add(codes: I64, problem: Problem, label: str) -> _Candidate:
            found.append(_Candidate(schedule_score(problem, priority, budget), codes, problem, label))
            return found[-1]

        def refits(timeline: Problem, gates: Sequence[float], label: str) -> None:
            choices, ms = self._memory_choices(prep, timeline, priority, time_limit_s)
            solve_ms.extend(ms)
            for k, choice in enumerate(choices):
                for factor in gates:
                    gated = replace(timeline, mem_cap_bytes=budget * factor)
                    add(choice, self._problem_for(prep, choice, like=gated), f"{label} mix {k}, gate {factor:.0%}")

        uniform_starts: dict[int, list[_Candidate]] = {}
        for policy in BASE_POLICIES:
            mine: list[_Candidate] = []
            for code, plain in enumerate(uniform):
                codes = np.full(n, code, dtype=np.int64)
                if code >= len(STRATEGIES) and pairs.chain_gap_ms is not None and pairs.copy_ms is not None:
                    # Offload only the pairs whose dependency chain leaves room for both copies; the others keep
                    # the same recompute level in place (a pair right before its own backward would only wait).
                    level = STRATEGIES.index(code_recompute(code))
                    room = pairs.chain_gap_ms >= OFFLOAD_MIN_GAP * 2.0 * pairs.copy_ms[:, code]
                    codes = np.where(room, code, level).astype(np.int64)
                    plain = self._problem_for(prep, codes)
                for factor in BASE_CAP_FACTORS:
                    problem = replace(plain, mem_cap_bytes=budget * factor, policy=policy)
                    label = f"{code_label(code)}, {policy_name(policy)}, gate {factor:.0%}"
                    mine.append(add(codes, problem, label))
            uniform_starts[policy] = mine
        if memory and n:
            programs: list[tuple[Problem, str]] = []
            """(timeline, label) of each memory program, likeliest first."""
            for policy in PROGRAM_POLICIES:
                if policy in RELAXED_POLICIES:
                    for code in (0, 1):
                        for relax in RELAXED_GATES:
                            timeline = replace(uniform[code], mem_cap_bytes=budget * relax, policy=policy)
                            programs.append(
                                (
                                    timeline,
                                    f"{STRATEGIES[code].value}, {policy_name(policy)}, relaxed gate {relax:.0%}:",
                                )
                            )
                # The best start with offloading and the best without are both refitted: offloading adds starting
                # points, it does not take the refits the plans without it would get (on t2v-s, where no
                # offloading plan fits, it had made the plans 1-3% slower).
                mine = uniform_starts[policy]
                lean = mine[_FULL * len(BASE_CAP_FACTORS)]
                starts = [lean] + [min(kind, key=lambda c: c.score) for kind in _by_offloading(mine) if kind]
                for k, start in enumerate(starts):
                    if all(start is not other for other in starts[:k]):  # once each (the lean one may be a best)
                        programs.append((start.problem, f"refit of {start.label}:"))
            for k, (timeline, label) in enumerate(programs):
                if k and time.perf_counter() >= programs_until:
                    break
                refits(timeline, (1.0,), label)
        if memory and n:
            # Refit again on the best mixes' own timelines: a mix's strategies change when its pairs overlap, so
            # the programs' next answer can be faster still (each round keeps the best of its choices and gates).
            found.sort(key=lambda c: c.score)
            mixes = [c for c in found if " mix " in c.label]
            for start in [c for kind in _by_offloading(mixes) for c in kind[:REFIT_STARTS]]:
                current = start
                for round_ in range(REFIT_ROUNDS):
                    if time.perf_counter() >= refit_until:
                        break
                    before = len(found)
                    refits(current.problem, (1.0, 0.9), f"{start.label} / refit {round_ + 1}:")
                    current = min(found[before:], key=lambda c: c.score)
        found.sort(key=lambda c: c.score)
        return found, uniform, solve_ms

    def _pick_base(
        self, prep: _Prepared, candidates: list[_Candidate], priority: np.ndarray, *, repair_until: float = math.inf
    ) -> tuple[I64, Problem, list[list[int]], tuple[Plan, SimResult], str] | None:
        """The candidate whose SEMU simulation is fastest among those that fit: the best `BASE_CHECKS` by score
        are simulated, then more in score order only until one fits. None when none fits. With offloading, the
        candidates with and without it are checked so apart (the best without it is simulated whatever the scores
        of those with it), and the faster of the two picks wins."""
        picks = [self._pick_among(prep, kind, priority, repair_until) for kind in _by_offloading(candidates) if kind]
        fitting = [p for p in picks if p is not None]
        return min(fitting, key=lambda p: p[3][1].makespan_ms) if fitting else None

    def _pick_among(
        self, prep: _Prepared, candidates: list[_Candidate], priority: np.ndarray, repair_until: float
    ) -> tuple[I64, Problem, list[list[int]], tuple[Plan, SimResult], str] | None:
        best: tuple[I64, Problem, list[list[int]], tuple[Plan, SimResult], str] | None = None
        seen: list[tuple[bytes, list[list[int]]]] = []
        checked = 0
        repairs = 0
        for candidate in candidates:
            codes, problem, label = candidate.codes, candidate.problem, candidate.label
            if best is not None and checked >= BASE_CHECKS:
                break
            seqs = self._orders_from_positions(problem, interleave(problem, stage_priorities(problem, priority))[0])
            key = (codes.tobytes(), seqs)
            if key in seen:
                continue  # the same plan as one simulated already
            seen.append(key)
            built = self._assemble_simulate(prep, seqs, codes)
            checked += 1
            if not self._fits(built[1]) and repairs < REGATED_CANDIDATES and time.perf_counter() < repair_until:
                # SEMU's timeline is not the interleaver's (receive buffers, link queueing): the best starting
                # points often overflow by a fraction of a GiB, and the next one that fits can be 5% slower. The
                # same strategies under a slightly tighter gate usually fit and keep most of the speed.
                repairs += 1
                regated = self._regated(prep, problem, priority, codes, seqs, repair_until)
                if regated is not None:
                    problem, seqs, built, factor = regated
                    label = f"{label}, re-gated {factor:.0%}"
            if self._fits(built[1]) and (best is None or built[1].makespan_ms < best[3][1].makespan_ms):
                best = (codes, problem, seqs, built, label)
        return best

    def _regated(
        self,
        prep: _Prepared,
        problem: Problem,
        priority: F64,
        codes: I64,
        seqs: list[list[int]],
        until: float,
    ) -> tuple[Problem, list[list[int]], tuple[Plan, SimResult], float] | None:
        """The plan of `priority` and `codes` under the first of `REGATE_FACTORS`' tighter memory gates whose SEMU
        timeline fits, tried while `time.perf_counter() < until`: (problem, orders, (plan, simulation), factor), or
        None. `seqs` are the orders under `problem`'s own gate (a gate that changes nothing is not simulated)."""
        for factor in REGATE_FACTORS:
            if time.perf_counter() >= until:
                return None
            tight = replace(problem, mem_cap_bytes=problem.mem_cap_bytes * factor)
            tight_seqs = self._orders_from_positions(tight, interleave(tight, stage_priorities(tight, priority))[0])
            if tight_seqs == seqs:
                continue  # the gate did not bind any tighter: the same plan
            repaired = self._assemble_simulate(prep, tight_seqs, codes)
            if self._fits(repaired[1]):
                return tight, tight_seqs, repaired, factor
        return None

    def _post_search_s(self, prep: _Prepared, pre_s: float) -> float:
        """Time to keep after the search for the rest of `plan` up to the validated plan (memory re-fit, SEMU check,
        compile, simulate, fit, validate), so that the plan is ready within the budget.

        Measured on this planner's recent batches, per stage (it scales with the plan's size), the largest of the
        last few; before any measurement, as much as the preparation took (it does about as much work)."""
        n = max(prep.problem.n, 1)
        if self._post_rates:
            return max(self._post_rates) * n
        return pre_s

    def _note_post_search(self, prep: _Prepared, post_s: float) -> None:
        self._post_rates.append(post_s / max(prep.problem.n, 1))
        del self._post_rates[:-5]

    def plan(self, batch: BatchMetadata, *, job_id: str = "", budget_ms: float | None = None) -> PlanResult:
        """Plan `batch` within about `budget_ms` of wall time (default: the config's); see `SearchConfig.budget_ms`."""
        t0 = time.perf_counter()
        budget = self.config.budget_ms if budget_ms is None else budget_ms
        deadline = t0 + budget / 1e3
        level = self.config.level
        if self._post_config is not self.config:  # another configuration does other work after the search
            self._post_rates.clear()
            self._post_config = self.config
        hits0, misses0 = self.cache.hits, self.cache.misses
        header = self.header_for(batch, job_id=job_id, source=PlanSource.SEARCH, schedule="pipeweaver")
        prep = self._prepare(batch, header, Recompute.NONE)
        pipelines = tuple(p.name for p in header.placement.pipelines)
        heuristic = heuristic_group_order(prep.problem, pipelines)
        priority = priorities_from_order(heuristic)
        pairs = self._pairs(prep, batch)
        budget_bytes = self._budget_bytes(prep)
        evaluations = 0
        solve_ms: list[float] = []
        codes = np.zeros(len(pairs.keys), dtype=np.int64)
        problem = prep.problem
        checked: tuple[Plan, SimResult] | None = None
        """The final plan and its simulation when an earlier step already built them."""

        if level is SearchLevel.PARTITION:
            # The static order (the spec's FLOPs, not SEMU's costs), with the fastest uniform strategy that fits.
            uniform = [self._problem_for(prep, np.full(len(pairs.keys), c, dtype=np.int64)) for c in range(3)]
            index = {s: i for i, s in enumerate(prep.problem.stages)}
            work = stage_work(self.model, batch, header, prep.graph)
            static = fallback_orders(header, interleave, prep.graph, work=work)
            seqs = [[index[c.stage] for c in order] for order in static]
            codes, checked = self._uniform_fit(batch, seqs_plan=seqs, prep=prep)
            start = f"static order, {STRATEGIES[int(codes[0])].value if len(codes) else 'none'}"
            t_post = time.perf_counter()
        else:
            # Levels 2-4 start from the best of the uniform strategies under both interleaving policies, the memory
            # gate at the real budget (level 4 adds the memory programs' mixes), by SEMU among those that fit.
            # The candidates' memory programs run without CP-SAT (the bound's proof or the best heuristic answer):
            # CP-SAT on 45 vlm-s candidates took ~1.6 s and ranked them alike.
            # Refitting the best mixes again and re-gating overflowing starting points cost interleavings and
            # SEMU runs: only in the first half of the budget, so that MCTS keeps time (vlm-l's preparation alone
            # takes longer: there they would add ~1 s and found nothing). A run bounded by evaluations always
            # does them (deterministic).
            # The memory programs themselves stop (after the likeliest one) once only the time the work after the
            # search takes is left (`_post_search_s`, which MCTS also leaves): on a short budget they alone had
            # taken vlm-s's planning past it; where the budget holds them all, they all run (docs/benchmarks.md).
            # Not before this planner has measured that work: a guess would cut a cold first plan at random.
            repair_until = math.inf if self.config.max_evaluations is not None else t0 + budget / 2e3
            programs_until = (
                math.inf
                if self.config.max_evaluations is not None or not self._post_rates
                else deadline - self._post_search_s(prep, time.perf_counter() - t0)
            )

            def starting_points(at: np.ndarray) -> tuple[list[_Candidate], list[Problem]]:
                found, uniform_problems, more_ms = self._base_candidates(
                    prep,
                    at,
                    budget_bytes,
                    0.0,
                    memory=level >= SearchLevel.MEMORY,
                    refit_until=repair_until,
                    programs_until=programs_until,
                )
                solve_ms.extend(more_ms)
                return found, uniform_problems

            candidates, uniform = starting_points(priority)
            order_note = ""
            if level >= SearchLevel.MCTS:
                # Segment ordering starts with the microbatches' order: with clips of 16k to 74k tokens the given
                # order fills and drains the pipeline with long microbatches, and MCTS's rollouts stay near the
                # order they start from. The starting points of each sized order (`sized_group_orders`) compete
                # by their best interleaved score; the winner's order is MCTS's root. Only in the first half of
                # the budget, as the re-gating: vlm-l's preparation already takes longer.
                for name, order in sized_group_orders(prep.problem, pipelines).items():
                    if time.perf_counter() >= repair_until:
                        break
                    order_priority = priorities_from_order(order)
                    more, _ = starting_points(order_priority)
                    if more and (not candidates or more[0].score < candidates[0].score):
                        candidates, heuristic, priority, order_note = more, order, order_priority, f", {name}"
            picked = self._pick_base(prep, candidates, priority, repair_until=repair_until)
            if picked is None:  # nothing fits in SEMU: the leanest, ALTERNATE, repaired below by `_fit_memory`
                start = "none fitted: full, alternate, gate 100%"
                codes = np.full(len(pairs.keys), _FULL, dtype=np.int64)
                problem = replace(uniform[_FULL], mem_cap_bytes=budget_bytes)
                seqs = self._orders_from_positions(problem, interleave(problem, stage_priorities(problem, priority))[0])
            else:
                codes, problem, seqs, checked, start = picked
                start += order_note
            base = (codes, problem, seqs, checked)
            t_post = time.perf_counter()
            if level >= SearchLevel.MCTS and len(problem.groups) > 1:
                target = problem

                def evaluate(group_priority: np.ndarray) -> float:
                    return schedule_score(target, group_priority, budget_bytes)

                search_deadline = deadline - self._post_search_s(prep, t_post - t0)
                if self.config.workers > 1:
                    best_order, _, evaluations = self._pool().search(
                        problem,
                        heuristic,
                        config=self.config.mcts,
                        seed=self.config.seed,
                        deadline=search_deadline,
                        budget_bytes=budget_bytes,
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
                t_post = time.perf_counter()
                if tuple(best_order) != tuple(heuristic):  # unchanged order: keep the base plan (no SEMU re-check)
                    priority = priorities_from_order(best_order)
                    if level >= SearchLevel.MEMORY:  # re-fit the strategies to the better order's timeline
                        # Out of budget: the greedy choice, no bound (unless the run is deterministic).
                        exact = self.config.max_evaluations is not None or time.perf_counter() < deadline
                        codes, problem, more_ms = self._refit_memory(
                            prep, priority, codes, problem, self._ilp_limit(deadline), exact, budget_bytes
                        )
                        solve_ms += more_ms
                    seqs = self._orders_from_positions(
                        problem, interleave(problem, stage_priorities(problem, priority))[0]
                    )
                    in_time = self.config.max_evaluations is not None or time.perf_counter() < deadline
                    if base[3] is None or (in_time and (seqs != base[2] or not np.array_equal(codes, base[0]))):
                        # The interleaver models transfers as delays; SEMU also queues them on links and starts a
                        # receive when its consumer is next. Keep the searched plan only if SEMU agrees it beats the
                        # base (which fits), so a level never does worse than the one below.
                        t_check = time.perf_counter()
                        searched = self._assemble_simulate(prep, seqs, codes)
                        one_check_s = time.perf_counter() - t_check
                        regate_note = ""
                        if base[3] is not None and not self._fits(searched[1]):
                            # As with the starting points: a faster order whose SEMU timeline overflows by a
                            # fraction of a GiB sometimes fits under a slightly tighter gate and stays faster. More
                            # MCTS (more workers) finds such orders more often: on t2v-s batch 1, 2 workers ended at
                            # the base's 30.28 s in 3 of 4 runs where 1 worker reached 29.73 (docs/benchmarks.md).
                            # The search's reserve after MCTS rarely leaves time for a try, so one try may run past
                            # the deadline; the reserve then grows with the time this batch took after its search
                            # (`_note_post_search`).
                            deterministic = self.config.max_evaluations is not None
                            until = math.inf if deterministic else max(deadline, time.perf_counter()) + one_check_s
                            regated = self._regated(prep, problem, priority, codes, seqs, until)
                            if regated is not None:
                                problem, seqs, searched, factor = regated
                                regate_note = f" / searched order re-gated {factor:.0%}"
                        if base[3] is not None and not (
                            self._fits(searched[1]) and searched[1].makespan_ms < base[3][1].makespan_ms
                        ):
                            codes, problem, seqs, checked = base
                        else:
                            checked = searched
                            start += regate_note
                    else:
                        codes, problem, seqs, checked = base

        if checked is None:
            checked = self._assemble_simulate(prep, seqs, codes)
        plan, sim = checked
        if not self._fits(sim):
            plan, sim = self._fit_memory(
                prep, plan, sim, codes, None if level is SearchLevel.PARTITION else priority, problem, budget_bytes
            )
        # The memory-time bound holds for every schedule that fits the device's budget (SEMU's check; the gate keeps
        # receive headroom on top, which a schedule need not).
        bound = lower_bound_ms(prep.problem, uniform, self._device_budget_bytes().tolist())
        plan = _with_header(sim.annotate(plan), lower_bound_ms=bound)
        search_ms = (time.perf_counter() - t0) * 1e3
        if self.config.validate_plans:
            validate(plan, graph=prep.graph)
        self._note_post_search(prep, time.perf_counter() - t_post)
        baselines = self.baseline_makespans(batch) if self.config.compare_baselines else {}
        over = self.baselines_over_memory(batch) if self.config.compare_baselines else {}
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
            start=start,
            baselines_over_memory=over,
        )

    def _assemble_simulate(self, prep: _Prepared, seqs: list[list[int]], codes: I64) -> tuple[Plan, SimResult]:
        """Compile per-rank stage orders (indexes into the problem) with per-pair strategies, and simulate."""
        stages = prep.problem.stages
        pairs = prep.pairs
        assert pairs is not None
        has_pair = pairs.of_stage >= 0
        safe = np.where(has_pair, pairs.of_stage, 0)
        code = np.where(has_pair, codes[safe], 0).tolist() if len(codes) else [0] * len(stages)
        first = len(STRATEGIES)
        orders = [
            [
                Compute(stages[i], code_recompute(code[i]), offload=code[i] >= first and stages[i].pass_ is Pass.F)
                for i in seq
            ]
            for seq in seqs
        ]
        plan = assemble_plan(prep.header, orders, prep.shapes.tensors, graph=prep.graph)
        costs = self._stage_costs_for(prep, codes)
        if pairs.copy_ms is not None and len(codes) and bool(np.any(codes >= first)):
            copy = pairs.copy_ms[np.arange(len(codes)), codes]
            copy_ms = {stages[f]: float(c) for f, c in zip(pairs.forward.tolist(), copy.tolist(), strict=True) if c > 0}
            plan = place_prefetches(plan, costs.compute_ms, copy_ms)
        return plan, simulate(plan, costs, link=self.link)

    def _fit_memory(
        self,
        prep: _Prepared,
        plan: Plan,
        sim: SimResult,
        codes: I64,
        priority: np.ndarray | None,
        problem: Problem,
        budget: F64,
    ) -> tuple[Plan, SimResult]:
        """SEMU says the plan overflows a device (its timeline, with link queueing, differs from the
        interleaver's). Re-interleave the same priorities under tighter caps (fractions of the real budget), with
        `problem`'s policy, first with the chosen strategies, then with the leanest; then the static fallback order
        with the leanest strategies. Keep the first that fits SEMU, else the one that overflows least."""
        lean = np.full(len(codes), _FULL, dtype=np.int64)
        tried: list[tuple[Plan, SimResult]] = [(plan, sim)]

        def attempt(seqs: list[list[int]], strategies: I64) -> bool:
            tried.append(self._assemble_simulate(prep, seqs, strategies))
            return self._fits(tried[-1][1])

        if priority is not None:
            for strategies in (codes, lean):
                base = self._problem_for(prep, strategies, like=problem)
                for factor in (0.9, 0.75, 0.6):
                    tight = replace(base, mem_cap_bytes=budget * factor)
                    seqs = self._orders_from_positions(tight, interleave(tight, stage_priorities(tight, priority))[0])
                    if attempt(seqs, strategies):
                        return tried[-1]
        index = {s: i for i, s in enumerate(prep.problem.stages)}
        static = fallback_orders(prep.header, interleave, prep.graph, lean=True)
        if attempt([[index[c.stage] for c in order] for order in static], lean):
            return tried[-1]
        return min(tried, key=lambda t: float(np.max(t[1].peak_memory_bytes)))

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

    def _uniform_fit(
        self, batch: BatchMetadata, *, seqs_plan: list[list[int]], prep: _Prepared
    ) -> tuple[I64, tuple[Plan, SimResult] | None]:
        """The fastest single strategy for every stage whose simulated peak fits every rank (full if none), with
        its compiled plan and simulation (None when none fits)."""
        n = len(self._pairs(prep, batch).keys)
        for code in range(len(STRATEGIES)):
            codes = np.full(n, code, dtype=np.int64)
            built = self._assemble_simulate(prep, seqs_plan, codes)
            if self._fits(built[1]):
                return codes, built
        return np.full(n, _FULL, dtype=np.int64), None

    def _fits(self, sim: SimResult) -> bool:
        """Device memory on every rank, and the pinned host memory offloaded activations take (per GPU)."""
        host = sim.host_peak_bytes
        if host is not None and bool(np.any(host > self.hardware.host_memory_bytes)):
            return False
        return bool(np.all(sim.peak_memory_bytes <= self.hardware.memory_bytes))

    def baseline_makespans(self, batch: BatchMetadata, names: Sequence[str] | None = None) -> dict[str, float]:
        """Predicted makespan on `batch` of each baseline whose simulation fits device memory (see
        `baseline_results`); one that overflows even with full recompute does not run, so it has no makespan to
        compare with (`baselines_over_memory` lists it)."""
        return {name: sim.makespan_ms for name, sim in self.baseline_results(batch, names).items() if self._fits(sim)}

    def baselines_over_memory(self, batch: BatchMetadata, names: Sequence[str] | None = None) -> dict[str, float]:
        """Peak device memory (bytes, the fullest rank) of each baseline that does not fit even with full recompute."""
        return {
            name: float(np.max(sim.peak_memory_bytes))
            for name, sim in self.baseline_results(batch, names).items()
            if not self._fits(sim)
        }

    def fits_memory(self, sim: SimResult) -> bool:
        """Whether a simulation's peak memory fits every device (what a plan needs to run)."""
        return self._fits(sim)

    def baseline_results(self, batch: BatchMetadata, names: Sequence[str] | None = None) -> dict[str, SimResult]:
        """Each baseline simulated on `batch`, with the fastest uniform recompute strategy that fits device memory
        (what a Megatron user sets with --recompute-granularity); full recompute if none fits.

        The results for the most recent batch are kept: `plan` computes them, and callers that report them too
        (`pipeweaver bench`) ask again for the same batch."""
        if self._baseline_memo is None or not (self._baseline_memo[0] is batch or self._baseline_memo[0] == batch):
            self._baseline_memo = (batch, {})
        memo = self._baseline_memo[1]
        out: dict[str, SimResult] = {}
        for name in names or self.config.compare_baselines:
            if name not in memo:
                try:
                    plan = build_baseline_plan(
                        name, model=self.model, parallel=self.parallel, batch=batch, hardware=self.hardware
                    )
                except ValueError:
                    memo[name] = None  # the baseline cannot cut this model (e.g. too few layers for its chunks)
                    continue
                memo[name] = self.baseline_result(plan, batch)
            found = memo[name]
            if found is not None:
                out[name] = found
        return out

    def baseline_result(self, plan: Plan, batch: BatchMetadata) -> SimResult:
        """Simulate a baseline plan with the fastest uniform recompute strategy that fits memory."""
        sim = self.simulate_plan(plan, batch)
        if self._fits(sim):
            return sim
        for rc in (Recompute.SELECTIVE, Recompute.FULL):
            # Every stage of the plan under one strategy: that strategy's costs as they are (what `stage_costs`
            # assembles stage by stage from a per-pair map, without the walk).
            costs = self._header_costs(plan.header, batch, rc)
            uniform = StageCosts(
                compute_ms=costs.duration_ms,
                act_bytes=costs.act_bytes_by_forward(),
                static_bytes=self._static_for(plan.header),
                workspace_bytes=costs.workspace_bytes,
            )
            sim = simulate(plan, uniform, link=self.link)
            if self._fits(sim):
                return sim
        return sim

    def fallback_plan(self, batch: BatchMetadata, *, job_id: str = "", deadline: float | None = None) -> Plan:
        """The static fallback for `batch` (what the service serves when a search misses its deadline): the first
        of `LOOSE_FALLBACKS` that fits device memory in SEMU, else a trainer's own fallback (lean memory cap).

        `deadline` (`time.monotonic` clock) bounds the looser tries: one is made only if it and the lean build
        can still finish before it, at the times this planner's last ones took. A fallback served late is worth
        nothing (the trainer has run its own by then), so near a deadline the lean one comes at once. A fallback
        whose tries (at least one) all overflowed counts as a miss; one that could try none does not."""
        part = self.partition

        def build(**kwargs: Any) -> Plan:
            return build_fallback_plan(
                self.model,
                part.placement,
                part.sub_microbatch_size,
                batch,
                job_id=job_id,
                dtype=self.dtype,
                interleaver=interleave,
                **kwargs,
            )

        def lean() -> Plan:
            t0 = time.monotonic()
            plan = build()
            self._lean_fallback_s = time.monotonic() - t0
            return plan

        if self._loose_fallback_misses < LOOSE_FALLBACK_MISSES_BEFORE_SKIP:
            # From one rung looser than the last that fit (batches of a job fit alike): usually one or two tries.
            first = max(0, self._fallback_rung - 1)
            for rung in range(first, len(LOOSE_FALLBACKS)):
                if deadline is not None and time.monotonic() + self._loose_try_s + self._lean_fallback_s > deadline:
                    if rung > first:  # the tries made all overflowed: a miss, as when every rung was tried
                        self._loose_fallback_misses += 1
                        self._fallback_rung = 0
                    return lean()
                t0 = time.monotonic()
                cap_scale, unit_costs = LOOSE_FALLBACKS[rung]
                plan = build(cap_scale=cap_scale, unit_costs=unit_costs)
                fits = self._fits(self.simulate_plan(plan, batch))
                self._loose_try_s = time.monotonic() - t0
                if fits:
                    self._loose_fallback_misses = 0
                    self._fallback_rung = rung
                    return plan
            self._loose_fallback_misses += 1
            self._fallback_rung = 0
        return lean()


LOOSE_FALLBACKS: tuple[tuple[float, bool], ...] = (
    (math.inf, True),
    (2.0, False),
    (1.5, False),
    (1.0, False),
    (0.5, False),
)
"""(memory cap scale, unit costs) of the looser fallbacks `Planner.fallback_plan` tries, loosest first, before a
trainer's own (lean cap, FLOP costs), keeping the first that fits device memory in SEMU; a job's next fallback
starts one rung looser than the last that fit. The rungs between "no cap" and the lean cap matter when the
uncapped order overflows: on the scaled T2V of the 4-GPU runs (SEMU uncalibrated, seed 0) the uncapped order
overflows the 40 GB planning budget on iterations 0 and 3 and the lean one takes 1.55-1.59 s, the 1.5 rung fits
at 0.48-0.50 s (measured on 4 H200s: the served lean fallback ran 3.8 s where Optimus's schedule took 1.4 s,
docs/gpu.md section 6); on t2v-s the 1.0-1.5 rungs take 37-56 s against the lean 47-71 s. On the scaled VLM
(`benchmarks/bench_planner_variants.py --only fallback`, `benchmarks/results/planner_variants_fallback.json`) the
uncapped one with unit costs fits 2 of 5 batches at 0.40-0.47 s (lean: 0.89-1.03 s). Each try costs an assembly
and a simulation (~25-50 ms on the scaled models, a few hundred ms on vlm-s, where none fits): see
`LOOSE_FALLBACK_MISSES_BEFORE_SKIP`."""

LOOSE_FALLBACK_MISSES_BEFORE_SKIP = 3
"""After this many fallbacks in a row whose looser variants all overflowed, a planner builds the lean one
directly (a memory-bound job would pay for the tries every time; the fallback's time is reserved before every
deadline)."""

BASE_CAP_FACTORS: tuple[float, ...] = (1.0, 0.9)
"""Memory gates (fractions of each rank's real budget) of the uniform starting points (`_base_candidates`): the
interleaver's timeline is not SEMU's (SEMU queues transfers on links and starts a receive when its consumer is
next), so a schedule gated at the full budget sometimes overflows in SEMU where one gated at 90% fits."""

RELAXED_GATES: tuple[float, ...] = (1.25, 2.0)
"""Memory gates (fractions of the real budget) of the relaxed timelines the memory programs also solve on (see
`Planner._base_candidates`)."""

RELAXED_POLICIES: tuple[int, ...] = (Policy.EARLIEST,)
"""Policies whose relaxed timelines are solved on."""

PROGRAM_POLICIES: tuple[int, ...] = (
    Policy.EARLIEST,
    Policy.ALTERNATE | ACTIVE,
    Policy.ALTERNATE,
    Policy.EARLIEST | ACTIVE,
)
"""The order in which `Planner._base_candidates` solves the policies' memory programs (each policy's relaxed
timelines, then its refits), which matters only when the budget cuts them short. Counted over the 120 starting
points recorded in benchmarks/results: earliest's relaxed timelines began 70 plans, its refits 24, alternate+
active's refits 5, earliest+active's 1, alternate's none (the uniform schedules, which are always there, 20)."""

BASE_POLICIES: tuple[int, ...] = (
    Policy.ALTERNATE,
    Policy.EARLIEST,
    Policy.ALTERNATE | ACTIVE,
    Policy.EARLIEST | ACTIVE,
)
"""Interleaving policies of the starting points (`Planner._base_candidates`); MCTS then searches under the picked
one. The active-schedule variants (a rank may wait for a better stage about to be ready) brought small instances
from 5.2% to 2.7% above CP-SAT's best (`bench_search.py --only gap`). As planner candidates (seed 0, 8 batches,
700 ms, `benchmarks/bench_planner_variants.py --only policies`, `benchmarks/results/planner_variants_policies.json`):
tiny-vlm 225.7 -> 222.9 ms mean (picked on 2 batches), tiny-t2v 449.5 -> 449.7, vlm-s 16.22 -> 16.20 s, t2v-s
31.45 -> 31.46 s (picked once): gains on small instances, noise elsewhere."""


def policy_name(policy: int) -> str:
    """`Policy` name, with "+active" when the `ACTIVE` flag is set (candidate labels)."""
    base = Policy(policy & ~ACTIVE).name.lower()
    return f"{base}+active" if policy & ACTIVE else base


RECEIVE_HEADROOM = 2.0
"""Receive buffers the memory gate keeps room for, in units of the rank's largest receive (`_budget_bytes`): at a
forward's start SEMU holds the inputs posted one compute ahead, and a post that keeps a pair's order can carry two
consumers' receives. Seeds 0-4 at 700 ms, against the plans made before SEMU counted receive buffers (which
overflowed by up to 1.4 GiB): 2 gave +1.3% makespan on t2v-s and +0.1% on vlm-s on average, 3 the same within
noise, 0 +5.5% and +1.6%."""

BASE_CHECKS = 1
"""Starting points simulated by SEMU (best interleaved scores first; more only while none fits). Each costs ~60 ms
on vlm-s (compile and simulate), and the interleaved score ranks the candidates as SEMU does: on 3 batches each
of vlm-s, vlm-m and t2v-s the second best by score beat the best in SEMU once, by 0.2%."""

REGATE_FACTORS: tuple[float, ...] = (0.99, 0.97, 0.94)
"""Tighter memory gates (fractions of the candidate's own) tried, in order, on a starting point that SEMU finds
overflowing, before moving on to the next candidate (`Planner._pick_base`). On t2v-s seed 0 batch 1 the two best
starting points overflowed rank 0 by 0.28 and 0.43 GB; the third, which fits, simulates 31.92 s, while the best
re-gated at 99% fits at 30.60 s (`benchmarks/bench_memory_variants.py`, its `starts`)."""

REFIT_STARTS = 2
REFIT_ROUNDS = 2
"""The best `REFIT_STARTS` memory-program mixes among the starting points are refitted `REFIT_ROUNDS` more times,
each on the timeline of the previous round's best (`Planner._base_candidates`)."""

REGATED_CANDIDATES = 2
"""Overflowing starting points `Planner._pick_base` tries to re-gate (each try costs an assembly and a SEMU run)."""

MEMORY_CAP_FACTORS: tuple[float, ...] = (1.0, 0.9)
"""Caps (fractions of each rank's activation budget) at which the memory programs are solved; see
`Planner._memory_choices`. The program's timeline is that of the schedule it refines; once faster strategies
shorten it, more pairs overlap, and the interleaver's memory gate then stalls forwards. Keeping 10% headroom is
sometimes the better trade: on 10 t2v-s batches (30 rollouts each) adding it improved the mean makespan by 1%."""

OVERFLOW_PENALTY = 10.0
"""Score multiplier per unit of relative memory overflow: a schedule that does not fit loses to one that does."""


def schedule_score(problem: Problem, group_priority: np.ndarray, budget_bytes: F64 | None = None) -> float:
    """What the search minimises: the interleaved makespan, penalised when a rank's activations overflow its
    budget (`budget_bytes` per rank, default the problem's cap; the planner passes the real budget, so that
    problems gated at different caps score alike)."""
    _, start, end, makespan = interleave(problem, stage_priorities(problem, group_priority))
    target = problem if budget_bytes is None else replace(problem, mem_cap_bytes=budget_bytes)
    return makespan * (1.0 + OVERFLOW_PENALTY * overflow(target, start, end))


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
    for policy in Policy:
        interleave(replace(tiny, policy=int(policy)), np.zeros(0))
    warm_memory_kernels()
    bounds.warm_kernels()
