"""Monte Carlo tree search over segment-group orders (paper section 5.1).

A tree node is a prefix of the group permutation; the group placed at position i of n gets priority n - i. Each
iteration selects a leaf by UCB, expands one child, completes the order with several random rollouts, scores each
with the interleaver, and backs up the *best* score (max, not mean) to the root.

Choices the paper leaves open (measurements in docs/benchmarks.md, "Small instances against the CP-SAT optimum"):
- score = reference makespan / makespan (higher is better, about 1); UCB = s^alpha + beta*sqrt(ln N_parent / N);
- rollouts are not uniform permutations: the remaining groups follow the heuristic order perturbed by Gumbel
  noise of a random temperature (a Plackett-Luce sample), which keeps rollouts near sane schedules on deep trees.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Order = tuple[int, ...]
Evaluate = Callable[[npt.NDArray[np.float64]], float]
"""Group-priority vector -> makespan in ms."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MCTSConfig:
    alpha: float = 8.0
    """Exponent sharpening score differences near 1 (a 1% better schedule scores about 8% higher)."""
    beta: float = 0.1
    """Exploration weight."""
    rollouts: int = 10
    """Random completions per expansion (paper: about 10)."""
    temperature: tuple[float, float] = (0.5, 8.0)
    """Range of the Gumbel-noise temperature of rollouts, in heuristic-rank units."""


@dataclass(slots=True)
class Node:
    item: int
    parent: Node | None
    depth: int
    visits: int = 0
    best: float = 0.0
    children: dict[int, Node] = field(default_factory=dict)


def priorities_from_order(order: Order) -> npt.NDArray[np.float64]:
    """Group priority vector: the group at position i of n gets n - i."""
    n = len(order)
    prio = np.zeros(n)
    for i, g in enumerate(order):
        prio[g] = n - i
    return prio


class SegmentOrderSearch:
    """Anytime MCTS over the order of `n_groups` groups; `best_order` is always a complete, evaluated order."""

    def __init__(
        self,
        n_groups: int,
        heuristic: Order,
        evaluate: Evaluate,
        *,
        config: MCTSConfig | None = None,
        seed: int = 0,
    ) -> None:
        if sorted(heuristic) != list(range(n_groups)):
            raise ValueError("heuristic must be a permutation of range(n_groups)")
        self.n = n_groups
        self.heuristic = heuristic
        self.heuristic_rank = np.empty(n_groups)
        self.heuristic_rank[list(heuristic)] = np.arange(n_groups)
        self.evaluate = evaluate
        self.config = config or MCTSConfig()
        self.rng = np.random.default_rng(seed)
        self.root = Node(item=-1, parent=None, depth=0)
        self.evaluations = 0
        self.reference_ms = self._score_order(heuristic)
        self.best_order: Order = heuristic
        self.best_ms = self.reference_ms

    def _score_order(self, order: Order) -> float:
        self.evaluations += 1
        return self.evaluate(priorities_from_order(order))

    def score(self, makespan_ms: float) -> float:
        return self.reference_ms / makespan_ms if makespan_ms > 0 else 1.0

    def _prefix(self, node: Node) -> list[int]:
        items: list[int] = []
        while node.parent is not None:
            items.append(node.item)
            node = node.parent
        return items[::-1]

    def _complete(self, prefix: list[int]) -> Order:
        used = set(prefix)
        rest = np.array([g for g in range(self.n) if g not in used], dtype=np.int64)
        lo, hi = self.config.temperature
        tau = math.exp(self.rng.uniform(math.log(lo), math.log(hi)))
        keys = self.heuristic_rank[rest] + tau * self.rng.gumbel(size=len(rest))
        return tuple(prefix) + tuple(int(g) for g in rest[np.argsort(keys, kind="stable")])

    def _ucb(self, child: Node, parent_visits: int) -> float:
        c = self.config
        explore = c.beta * math.sqrt(math.log(max(parent_visits, 1)) / max(child.visits, 1))
        return float(child.best**c.alpha + explore)

    def _select(self) -> Node:
        node = self.root
        while node.depth < self.n:
            untried = self.n - node.depth - len(node.children)
            if untried > 0:
                return node
            node = max(node.children.values(), key=lambda ch: self._ucb(ch, node.visits))
        return node

    def _expand(self, node: Node) -> Node:
        if node.depth >= self.n:
            return node
        used = set(self._prefix(node)) | set(node.children)
        free = np.array([g for g in range(self.n) if g not in used], dtype=np.int64)
        keys = self.heuristic_rank[free] + 2.0 * self.rng.gumbel(size=len(free))
        item = int(free[int(np.argmin(keys))])
        child = Node(item=item, parent=node, depth=node.depth + 1)
        node.children[item] = child
        return child

    def step(self) -> None:
        """One selection, expansion, `rollouts` evaluations and max back-up."""
        leaf = self._expand(self._select())
        prefix = self._prefix(leaf)
        best = 0.0
        for _ in range(self.config.rollouts):
            order = self._complete(prefix)
            ms = self._score_order(order)
            if ms < self.best_ms:
                self.best_ms, self.best_order = ms, order
            best = max(best, self.score(ms))
        node: Node | None = leaf
        while node is not None:
            node.visits += 1
            node.best = max(node.best, best)
            node = node.parent

    def root_statistics(self) -> dict[int, tuple[int, float]]:
        """Visits and best score of each root child (what parallel workers exchange)."""
        return {item: (ch.visits, ch.best) for item, ch in self.root.children.items()}

    def merge_root_statistics(self, stats: dict[int, tuple[int, float]]) -> None:
        """Fold another worker's root-child statistics into this tree (visits add, best is a max)."""
        for item, (visits, best) in stats.items():
            child = self.root.children.get(item)
            if child is None:
                child = Node(item=item, parent=self.root, depth=1)
                self.root.children[item] = child
            child.visits += visits
            child.best = max(child.best, best)
            self.root.visits += visits
            self.root.best = max(self.root.best, best)
