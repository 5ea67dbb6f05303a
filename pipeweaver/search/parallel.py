"""Parallel segment-order search: worker processes explore their own trees and share root statistics.

The paper's workers share one MCTS tree under a mutex. Python processes share no memory cheaply, so we run
rounds: every worker grows its tree for a slice of the budget starting from the merged root statistics of the
previous round (visits add, best scores take the max), and returns its statistics and best order. The
coordinator keeps the best complete order seen by anyone, so the search stays anytime.

Workers are spawn processes (gRPC, which the server imports, is not fork-safe) and import only numpy and numba.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeweaver.search.mcts import MCTSConfig, Order, SegmentOrderSearch
from pipeweaver.search.problem import Problem

RootStats = dict[int, tuple[int, float]]

# Per-process state: the problem (and overflow budget) of the current search and this worker's tree, by search id.
_PROBLEMS: dict[str, tuple[Problem, np.ndarray | None]] = {}
_TREES: dict[tuple[str, int], SegmentOrderSearch] = {}


@dataclass(frozen=True, slots=True)
class RoundResult:
    stats: RootStats
    """This round's root-child statistics (deltas to merge)."""
    best_order: Order
    best_score: float
    evaluations: int


def _score(problem: Problem, group_priority: np.ndarray, budget_bytes: np.ndarray | None) -> float:
    from pipeweaver.search.planner import schedule_score

    return schedule_score(problem, group_priority, budget_bytes)


def warm_up() -> int:
    """Compile (or load) the numba kernels in this process; returns the pid."""
    import os

    from pipeweaver.search.planner import warm_kernels

    warm_kernels()
    return os.getpid()


def run_round(
    search_id: str,
    worker: int,
    problem: Problem | None,
    heuristic: Order,
    config: MCTSConfig,
    seed: int,
    seconds: float,
    shared: RootStats,
    budget_bytes: np.ndarray | None = None,
) -> RoundResult:
    """One worker's round: grow its tree for `seconds` from the shared root statistics."""
    if problem is not None:
        for old in [k for k in _PROBLEMS if k != search_id]:
            del _PROBLEMS[old]
        for stale in [k for k in _TREES if k[0] != search_id]:
            del _TREES[stale]
        _PROBLEMS[search_id] = (problem, budget_bytes)
    prob, budget = _PROBLEMS[search_id]
    tree = _TREES.get((search_id, worker))
    if tree is None:
        tree = SegmentOrderSearch(
            len(prob.groups), heuristic, lambda g: _score(prob, g, budget), config=config, seed=seed * 1000 + worker
        )
        _TREES[(search_id, worker)] = tree
    before = tree.root_statistics()
    evals0 = tree.evaluations
    # Fold in what the other workers learnt (only their part: ours is already in the tree).
    foreign = {item: (v - before.get(item, (0, 0.0))[0], b) for item, (v, b) in shared.items()}
    tree.merge_root_statistics({k: (max(v, 0), b) for k, (v, b) in foreign.items()})
    after_merge = tree.root_statistics()
    deadline = time.perf_counter() + seconds
    tree.step()
    while time.perf_counter() < deadline:
        tree.step()
    now = tree.root_statistics()
    delta = {item: (v - after_merge.get(item, (0, 0.0))[0], b) for item, (v, b) in now.items()}
    return RoundResult(
        stats=delta, best_order=tree.best_order, best_score=tree.best_ms, evaluations=tree.evaluations - evals0
    )


class SearchPool:
    """A spawn process pool for the segment-order search, created and warmed once per planner."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        ctx = multiprocessing.get_context("spawn")
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        # Spawn starts workers lazily: submit one warm-up per worker so all exist and have compiled.
        list(self._pool.map(_warm, range(workers)))
        self._searches = 0

    def search(
        self,
        problem: Problem,
        heuristic: Order,
        *,
        config: MCTSConfig,
        seed: int,
        deadline: float,
        round_s: float = 0.1,
        budget_bytes: np.ndarray | None = None,
    ) -> tuple[Order, float, int]:
        """Best order found by all workers before `deadline` (time.perf_counter()); (order, score, evaluations).
        Orders are scored by `schedule_score(problem, priority, budget_bytes)`."""
        self._searches += 1
        search_id = f"s{self._searches}"
        shared: RootStats = {}
        best_order, best_score, evaluations = heuristic, float("inf"), 0
        first = True
        while True:
            left = deadline - time.perf_counter()
            if left <= 0 and not first:
                break
            seconds = max(0.0, min(round_s, left - 0.01))
            futures = [
                self._pool.submit(
                    run_round,
                    search_id,
                    w,
                    problem if first else None,
                    heuristic,
                    config,
                    seed,
                    seconds,
                    shared,
                    budget_bytes if first else None,
                )
                for w in range(self.workers)
            ]
            first = False
            for f in futures:
                r = f.result()
                evaluations += r.evaluations
                if r.best_score < best_score:
                    best_order, best_score = r.best_order, r.best_score
                for item, (v, b) in r.stats.items():
                    old_v, old_b = shared.get(item, (0, 0.0))
                    shared[item] = (old_v + v, max(old_b, b))
        return best_order, best_score, evaluations

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _warm(_: int) -> int:
    return warm_up()
