"""Per-rank memory programs: proven gaps against exact optima, feasibility, the fast paths and the CP-SAT fallback."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeweaver.search.memory_opt import (
    Candidate,
    _maximal,
    _ranges,
    _restrict,
    greedy_choice,
    optimise_rank,
    pair_candidates,
)


def _alive(start: list[float], end: list[float]) -> np.ndarray:
    """The program's definition, written out directly: pair i is live at pair k's start iff s_i <= s_k < t_i."""
    s, t = np.asarray(start), np.asarray(end)
    alive = (s[None, :] <= s[:, None]) & (s[:, None] < t[None, :])
    np.fill_diagonal(alive, True)
    return alive


def _fits(cands: list[tuple[Candidate, ...]], choice: tuple[int, ...], alive: np.ndarray, cap: float) -> bool:
    mem = np.array([cands[i][j].memory_bytes for i, j in enumerate(choice)])
    return bool(np.all(alive.astype(float) @ mem <= cap * (1 + 1e-9)))


def _latency(cands: list[tuple[Candidate, ...]], choice: tuple[int, ...]) -> float:
    return sum(cands[i][j].latency_ms for i, j in enumerate(choice))


def _instance(
    rng: np.random.Generator, n: int, *, layers: int = 2
) -> tuple[list[tuple[Candidate, ...]], list[float], list[float], float]:
    """Random pairs on a timeline, candidates from random per-layer costs, a cap between the leanest and the fastest
    choice's peak (so that memory binds but a choice fits)."""
    cands = []
    for _ in range(n):
        base = rng.uniform(1.0, 5.0)
        lat = (base, base * rng.uniform(1.05, 1.3), base * rng.uniform(1.25, 1.6))
        act = rng.uniform(1.0, 4.0) * 1e9
        mem = (act, act * rng.uniform(0.3, 0.7), act * rng.uniform(0.05, 0.2))
        cands.append(pair_candidates(int(rng.integers(1, layers + 1)), lat, mem, fixed_ms=1.0, fixed_bytes=1e8))
    start = np.sort(rng.uniform(0, 100, n))
    end = start + rng.uniform(5, 60, n)
    alive = _alive(list(start), list(end)).astype(float)
    lean = alive @ np.array([c[-1].memory_bytes for c in cands])
    fast = alive @ np.array([c[0].memory_bytes for c in cands])
    cap = float(lean.max() + rng.uniform(0.1, 0.9) * (fast.max() - lean.max()))
    return cands, list(start), list(end), cap


def _brute_force(cands: list[tuple[Candidate, ...]], alive: np.ndarray, cap: float) -> float:
    best = np.inf
    for choice in itertools.product(*(range(len(c)) for c in cands)):
        if _fits(cands, choice, alive, cap):
            best = min(best, _latency(cands, choice))
    return float(best)


def _cp_sat_optimum(cands: list[tuple[Candidate, ...]], alive: np.ndarray, cap: float) -> float:
    """An independent exact model (the one the planner used to build): booleans per candidate, one row per pair."""
    from ortools.sat.python import cp_model

    model = cp_model.CpModel()
    x = [[model.new_bool_var(f"x{i}_{j}") for j in range(len(c))] for i, c in enumerate(cands)]
    for row in x:
        model.add_exactly_one(row)
    unit = cap / 1e6
    for k in range(len(cands)):
        model.add(
            sum(
                int(np.ceil(cands[i][j].memory_bytes / unit)) * x[i][j]
                for i in np.flatnonzero(alive[k])
                for j in range(len(cands[i]))
            )
            <= int(cap / unit)
        )
    model.minimize(sum(round(c.latency_ms * 1e4) * x[i][j] for i, cs in enumerate(cands) for j, c in enumerate(cs)))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 2
    solver.parameters.max_time_in_seconds = 60
    assert solver.solve(model) == cp_model.OPTIMAL
    return float(solver.objective_value) / 1e4


@pytest.mark.parametrize("gap", [0.05, 0.01])
def test_within_the_gap_of_the_brute_force_optimum_on_small_random_instances(gap: float) -> None:
    rng = np.random.default_rng(7)
    for _ in range(40):
        cands, start, end, cap = _instance(rng, int(rng.integers(2, 7)))
        alive = _alive(start, end)
        optimum = _brute_force(cands, alive, cap)
        # A generous CP-SAT limit: this checks the answer's quality, not its speed (a loaded CI machine).
        result = optimise_rank(cands, start, end, cap, relative_gap=gap, time_limit_s=5.0)
        assert result.feasible
        assert _fits(cands, result.choice, alive, cap)
        assert result.latency_ms == pytest.approx(_latency(cands, result.choice))
        assert result.latency_ms <= optimum * (1 + gap) + 1e-6
        assert result.lower_bound_ms <= optimum + 1e-6
        assert result.latency_ms <= result.lower_bound_ms * (1 + result.optimal_gap) + 1e-6
        assert result.optimal_gap <= gap + 1e-12


def test_within_five_percent_of_the_cp_sat_optimum_on_larger_random_instances() -> None:
    rng = np.random.default_rng(11)
    gaps = []
    for _ in range(6):
        cands, start, end, cap = _instance(rng, 40, layers=3)
        alive = _alive(start, end)
        optimum = _cp_sat_optimum(cands, alive, cap)
        result = optimise_rank(cands, start, end, cap, time_limit_s=5.0)
        assert _fits(cands, result.choice, alive, cap)
        assert result.lower_bound_ms <= optimum + 1e-3
        assert result.latency_ms <= optimum * 1.05 + 1e-3
        gaps.append(result.latency_ms / optimum - 1)
    assert max(gaps) <= 0.05


def test_cp_sat_runs_when_the_bound_cannot_prove_the_gap() -> None:
    rng = np.random.default_rng(3)
    cands, start, end, cap = _instance(rng, 6)
    alive = _alive(start, end)
    optimum = _brute_force(cands, alive, cap)
    # No Lagrangian iterations: the bound is the fastest choice's latency, too weak to prove a zero gap.
    result = optimise_rank(cands, start, end, cap, relative_gap=0.0, max_iterations=0, time_limit_s=5.0)
    assert result.method == "cp-sat"
    assert _fits(cands, result.choice, alive, cap)
    assert result.latency_ms == pytest.approx(optimum, rel=1e-6)
    assert result.lower_bound_ms <= optimum + 1e-6


def test_plentiful_memory_takes_the_fastest_everywhere_without_a_program() -> None:
    rng = np.random.default_rng(1)
    cands, start, end, _ = _instance(rng, 8)
    result = optimise_rank(cands, start, end, 1e15)
    assert result.choice == (0,) * 8
    assert not result.solved
    assert result.method == "trivial"
    assert result.optimal_gap == 0.0


def test_a_cap_below_the_leanest_choice_is_infeasible() -> None:
    rng = np.random.default_rng(2)
    cands, start, end, _ = _instance(rng, 5)
    result = optimise_rank(cands, start, end, 1.0)
    assert not result.feasible
    assert result.method == "infeasible"


def test_greedy_start_always_fits_and_candidates_may_come_in_any_order() -> None:
    rng = np.random.default_rng(5)
    for _ in range(30):
        cands, start, end, cap = _instance(rng, int(rng.integers(1, 12)))
        alive = _alive(start, end)
        assert _fits(cands, greedy_choice(cands, start, end, cap), alive, cap)
        shuffled = [tuple(reversed(c)) for c in cands]
        result = optimise_rank(shuffled, start, end, cap)
        assert _fits(shuffled, result.choice, alive, cap)
        if len(cands) <= 6:
            assert result.latency_ms <= _brute_force(shuffled, alive, cap) * 1.05 + 1e-6


def test_kept_constraints_contain_every_live_set() -> None:
    """Dropping points whose live set sits inside a neighbour's loses no constraint."""
    rng = np.random.default_rng(9)
    for _ in range(50):
        n = int(rng.integers(1, 30))
        start = np.round(rng.uniform(0, 20, n))  # ties on purpose
        end = start + np.round(rng.uniform(1, 10, n))
        alive = _alive(list(start), list(end))
        lo, hi = _ranges(start, end)
        keep = _maximal(lo, hi, n)
        klo, khi, k = _restrict(lo, hi, keep)
        kept_sets = [set(np.flatnonzero((klo <= p) & (p < khi)).tolist()) for p in range(k)]
        for row in alive:
            live = set(np.flatnonzero(row).tolist())
            assert any(live <= kept for kept in kept_sets)
        # ... and every kept set is a real live set (at some pair's start).
        for kept in kept_sets:
            assert any(kept <= set(np.flatnonzero(row).tolist()) for row in alive)


def test_empty_rank() -> None:
    result = optimise_rank([], [], [], 1.0)
    assert result.choice == ()
    assert result.feasible
