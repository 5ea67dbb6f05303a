"""Spatial-temporal subgraph reuse: simulate each distinct (layer, sub-microbatch shape, strategy) once.

Spatial: a module is a stack of identical blocks, so a chunk's n layers of one module cost one lookup times n;
chunks of the same structure on different ranks (and every tp peer) share one stage entry. Temporal: the cache
object outlives a call, a search rollout and an iteration, so recurring shapes are table lookups.

Keys hold everything a cost depends on: (layer kind and dims, tp, token signature, pass, recompute) inside a
table per (hardware, efficiency factors, dtype). Values are computed from the canonical signature itself, with or
without a cache, so a hit returns bit-for-bit what a recomputation would: the cache never changes a result.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from pipeweaver.spec.batch import Instance

InstanceKey = tuple[int, tuple[int, ...], int, int]
"""(tokens, sorted attention spans, context tokens, output tokens) of one instance."""
TokenSignature = tuple[InstanceKey, ...]


def token_signature(instances: Iterable[Instance]) -> TokenSignature:
    """Canonical, hashable form of a sub-microbatch: its instances sorted, each with its spans sorted.

    Layer costs are invariant under reordering instances (they are packed) and spans (attention sums over them).
    """
    return tuple(
        sorted((i.tokens, tuple(sorted(i.attention_spans)), i.context_tokens, i.output_tokens) for i in instances)
    )


def signature_instances(signature: TokenSignature) -> tuple[Instance, ...]:
    """The canonical instances of a signature (what costs are computed from)."""
    return tuple(Instance(tokens=t, attention_spans=s, context_tokens=c, output_tokens=o) for t, s, c, o in signature)


@dataclass(frozen=True, slots=True)
class CacheStats:
    layer_hits: int
    layer_misses: int
    stage_hits: int
    stage_misses: int
    layers_served: int
    """Block evaluations answered (a chunk of n layers counts n): layers_served / layer lookups is spatial reuse."""

    @property
    def hits(self) -> int:
        return self.layer_hits + self.stage_hits

    @property
    def misses(self) -> int:
        return self.layer_misses + self.stage_misses

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class StageCostCache:
    """Memo of per-layer and per-stage costs, shared by any number of `CostModel`s and kept across iterations.

    Thread-safe enough for a thread pool under the GIL (dict reads and writes are atomic; a race computes a value
    twice, identically). Counters may undercount under threads; they are statistics, not logic.
    """

    def __init__(self, max_entries: int = 1_000_000) -> None:
        self.max_entries = max_entries
        self._tables: dict[Hashable, dict[Hashable, float]] = {}
        self._size = 0
        self.layer_hits = 0
        self.layer_misses = 0
        self.stage_hits = 0
        self.stage_misses = 0
        self.layers_served = 0

    def table(self, context: Hashable) -> dict[Hashable, float]:
        """The entries of one cost context (hardware, factors, dtype): costs from other contexts never mix."""
        t = self._tables.get(context)
        if t is None:
            t = self._tables.setdefault(context, {})
        return t

    def drop(self, context: Hashable) -> None:
        """Forget one context's entries (a cost model moved to other factors and will not come back to these)."""
        self._tables.pop(context, None)

    def lookup(
        self, table: dict[Hashable, float], key: Hashable, compute: Callable[[], float], *, stage: bool = False
    ) -> float:
        value = table.get(key)
        if value is not None:
            if stage:
                self.stage_hits += 1
            else:
                self.layer_hits += 1
            return value
        if stage:
            self.stage_misses += 1
        else:
            self.layer_misses += 1
        value = compute()
        if self._size >= self.max_entries:
            self.clear_entries()
        table[key] = value
        self._size += 1
        return value

    def note_layers(self, n: int) -> None:
        self.layers_served += n

    def clear_entries(self) -> None:
        """Drop every entry (keeps the statistics)."""
        for t in self._tables.values():
            t.clear()
        self._size = 0

    def clear(self) -> None:
        """Drop every entry and reset the statistics."""
        self.clear_entries()
        self.layer_hits = self.layer_misses = self.stage_hits = self.stage_misses = self.layers_served = 0

    def __len__(self) -> int:
        return self._size

    def stats(self) -> CacheStats:
        return CacheStats(self.layer_hits, self.layer_misses, self.stage_hits, self.stage_misses, self.layers_served)

    @property
    def hits(self) -> int:
        return self.layer_hits + self.stage_hits

    @property
    def misses(self) -> int:
        return self.layer_misses + self.stage_misses

    @property
    def hit_rate(self) -> float:
        """Hits over all lookups (layer and stage level)."""
        return self.stats().hit_rate

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"StageCostCache({len(self)} entries, hit rate {s.hit_rate:.1%}: layers {s.layer_hits}/"
            f"{s.layer_hits + s.layer_misses}, stages {s.stage_hits}/{s.stage_hits + s.stage_misses})"
        )
