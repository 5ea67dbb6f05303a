"""SEMU's hot loop: a dry run of a flattened plan, in numba and as a pure-Python twin.

`engine.flatten` turns a plan into the plain arrays of `FlatPlan` (every cross-rank match resolved in Python);
the two functions here only walk them. Both must give bit-identical results; the tests hold them to that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

COMPUTE = 0
"""Action kind: run `duration_ms` on the rank's compute stream."""
POST = 1
"""Action kind: post a batch of sends and receives at the rank's clock (takes no time; allocates the receive
buffers)."""
WAIT = 2
"""Action kind: block until every op of a posted batch has completed."""

OK = 0
DEADLOCK = 1


@dataclass(frozen=True, slots=True, eq=False)
class FlatPlan:
    """A plan as arrays: all ranks' actions concatenated; rank r owns [rank_offsets[r], rank_offsets[r+1])."""

    rank_offsets: IntArray
    """pp + 1 offsets into the action arrays."""
    kind: IntArray
    """COMPUTE, POST or WAIT per action."""
    duration_ms: FloatArray
    """Compute time per action (0 for communication actions)."""
    alloc_bytes: FloatArray
    """Memory an action allocates when it runs: a compute at its start (a forward's activations, less the receive
    buffers they take over), a POST its receive buffers."""
    free_bytes: FloatArray
    """Memory a compute frees when it ends (the activations its backward releases, receive buffers held until
    then)."""
    op_lo: IntArray
    """Per action, first op of its batch (POST: the batch it posts; WAIT: the batch it waits for)."""
    op_hi: IntArray
    """Per action, one past the last op of its batch."""
    op_match: IntArray
    """Per op, the matching op on the peer rank (a send's receive and vice versa)."""
    op_transfer: IntArray
    """Per op, the transfer it takes part in (shared by a send and its receive)."""
    transfer_ms: FloatArray
    """Per transfer, how long it occupies its directed link (latency + bytes / bandwidth)."""
    transfer_prev: IntArray
    """Per transfer, the previous transfer on the same directed link (FIFO), or -1."""
    static_bytes: FloatArray
    """Per rank, memory held for the whole step."""
    op_action: IntArray
    """Per op, the POST action that posts it (for error messages only; the kernels do not read it)."""

    @property
    def pp(self) -> int:
        return int(self.rank_offsets.shape[0]) - 1

    @property
    def num_actions(self) -> int:
        return int(self.kind.shape[0])

    def event_offsets(self) -> IntArray:
        """Where each rank's memory events start: one initial event plus at most two per action."""
        ranks = np.arange(self.pp + 1, dtype=np.int64)
        return (2 * self.rank_offsets + ranks).astype(np.int64)


@dataclass(frozen=True, slots=True, eq=False)
class FlatResult:
    """What a kernel run produces, still flat (see `engine.SimResult` for the per-rank view)."""

    status: int
    """OK, or DEADLOCK when no rank could move and some had actions left."""
    start_ms: FloatArray
    end_ms: FloatArray
    busy_ms: FloatArray
    peak_bytes: FloatArray
    event_time_ms: FloatArray
    event_bytes: FloatArray
    event_offsets: IntArray
    event_count: IntArray
    pc: IntArray
    """Per rank, the first action not executed (rank_offsets[r+1] when the rank finished)."""


_Outputs = tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray, FloatArray, IntArray, IntArray, IntArray]


def _outputs(flat: FlatPlan) -> _Outputs:
    """Zeroed output arrays: start, end, busy, peak, event times, event bytes, event offsets, counts, pc."""
    n, pp = flat.num_actions, flat.pp
    offsets = flat.event_offsets()
    n_events = int(offsets[-1])
    return (
        np.zeros(n, np.float64),
        np.zeros(n, np.float64),
        np.zeros(pp, np.float64),
        np.zeros(pp, np.float64),
        np.zeros(n_events, np.float64),
        np.zeros(n_events, np.float64),
        offsets,
        np.zeros(pp, np.int64),
        np.zeros(pp, np.int64),
    )


# ---- numba kernel ------------------------------------------------------------------------------------------


def _record(r: int, delta: float, t: float, mem: Any) -> None:  # pragma: no cover - numba
    """Change rank r's memory by `delta` bytes at time t: update its peak and append a memory event. `mem` is
    (memory, peak_bytes, event_offsets, event_count, event_time_ms, event_bytes), the kernel's arrays."""
    memory, peak_bytes, event_offsets, event_count, event_time_ms, event_bytes = mem
    memory[r] += delta
    if memory[r] > peak_bytes[r]:
        peak_bytes[r] = memory[r]
    e = event_offsets[r] + event_count[r]
    event_time_ms[e] = t
    event_bytes[e] = memory[r]
    event_count[r] += 1


def _kernel(
    rank_offsets: Any,
    kind: Any,
    duration_ms: Any,
    alloc_bytes: Any,
    free_bytes: Any,
    op_lo: Any,
    op_hi: Any,
    op_match: Any,
    op_transfer: Any,
    transfer_ms: Any,
    transfer_prev: Any,
    static_bytes: Any,
    event_offsets: Any,
    start_ms: Any,
    end_ms: Any,
    busy_ms: Any,
    peak_bytes: Any,
    event_time_ms: Any,
    event_bytes: Any,
    event_count: Any,
    pc: Any,
) -> int:
    """Round-robin dry run; fills the output arrays in place and returns OK or DEADLOCK.

    A transfer's end is computed when the second of its two ops is posted: by then the previous transfer on
    the same link is known (both its ops were posted earlier on the same two ranks, since ops match in
    posting order).
    """
    pp = rank_offsets.shape[0] - 1
    n_ops = op_match.shape[0]
    posted = np.zeros(n_ops, np.bool_)
    post_ms = np.zeros(n_ops, np.float64)
    transfer_end = np.zeros(transfer_ms.shape[0], np.float64)
    clock = np.zeros(pp, np.float64)
    memory = np.zeros(pp, np.float64)
    for r in range(pp):
        pc[r] = rank_offsets[r]
        memory[r] = static_bytes[r]
        peak_bytes[r] = static_bytes[r]
        busy_ms[r] = 0.0
        event_time_ms[event_offsets[r]] = 0.0
        event_bytes[event_offsets[r]] = static_bytes[r]
        event_count[r] = 1
    mem = (memory, peak_bytes, event_offsets, event_count, event_time_ms, event_bytes)
    while True:
        progress = False
        finished = True
        for r in range(pp):
            i = pc[r]
            hi = rank_offsets[r + 1]
            t = clock[r]
            while i < hi:
                k = kind[i]
                if k == 0:  # COMPUTE
                    start_ms[i] = t
                    if alloc_bytes[i] != 0.0:
                        _record(r, alloc_bytes[i], t, mem)
                    t = t + duration_ms[i]
                    busy_ms[r] += duration_ms[i]
                    end_ms[i] = t
                    if free_bytes[i] != 0.0:  # memory only falls: the peak check inside is a no-op
                        _record(r, -free_bytes[i], t, mem)
                elif k == 1:  # POST
                    if alloc_bytes[i] != 0.0:
                        _record(r, alloc_bytes[i], t, mem)
                    for o in range(op_lo[i], op_hi[i]):
                        post_ms[o] = t
                        posted[o] = True
                        m = op_match[o]
                        if posted[m]:
                            tr = op_transfer[o]
                            begin = max(post_ms[o], post_ms[m])
                            prev = transfer_prev[tr]
                            if prev >= 0 and transfer_end[prev] > begin:
                                begin = transfer_end[prev]
                            transfer_end[tr] = begin + transfer_ms[tr]
                    start_ms[i] = t
                    end_ms[i] = t
                else:  # WAIT
                    ready = True
                    done_at = t
                    for o in range(op_lo[i], op_hi[i]):
                        if not posted[op_match[o]]:
                            ready = False
                            break
                        if transfer_end[op_transfer[o]] > done_at:
                            done_at = transfer_end[op_transfer[o]]
                    if not ready:
                        break
                    start_ms[i] = t
                    t = done_at
                    end_ms[i] = t
                i += 1
            if i != pc[r]:
                progress = True
            pc[r] = i
            clock[r] = t
            if i < hi:
                finished = False
        if finished:
            return 0
        if not progress:
            return 1


_numba_kernel: Any
try:
    import numba

    _record = numba.njit(cache=True)(_record)  # before the kernel: it calls the compiled helper by this name
    _numba_kernel = numba.njit(cache=True)(_kernel)  # one signature: int64 and float64 arrays only
except ModuleNotFoundError:  # the trainer side installs no numba; it never simulates
    _numba_kernel = None


def run_numba(flat: FlatPlan) -> FlatResult:
    """Run the numba kernel (compiled on first use, cached on disk; set NUMBA_CACHE_DIR in containers)."""
    if _numba_kernel is None:
        raise ModuleNotFoundError("numba is missing: pip install 'pipeweaver[server]', or use_numba=False")
    start, end, busy, peak, ev_t, ev_b, ev_off, ev_n, pc = _outputs(flat)
    status = _numba_kernel(
        flat.rank_offsets,
        flat.kind,
        flat.duration_ms,
        flat.alloc_bytes,
        flat.free_bytes,
        flat.op_lo,
        flat.op_hi,
        flat.op_match,
        flat.op_transfer,
        flat.transfer_ms,
        flat.transfer_prev,
        flat.static_bytes,
        ev_off,
        start,
        end,
        busy,
        peak,
        ev_t,
        ev_b,
        ev_n,
        pc,
    )
    return FlatResult(int(status), start, end, busy, peak, ev_t, ev_b, ev_off, ev_n, pc)


# ---- pure-Python twin --------------------------------------------------------------------------------------


def run_reference(flat: FlatPlan) -> FlatResult:
    """The same dry run in plain Python, written independently of the kernel (transfers resolved lazily)."""
    pp = flat.pp
    offsets = flat.rank_offsets.tolist()
    kind = flat.kind.tolist()
    duration = flat.duration_ms.tolist()
    alloc = flat.alloc_bytes.tolist()
    free = flat.free_bytes.tolist()
    op_lo, op_hi = flat.op_lo.tolist(), flat.op_hi.tolist()
    match = flat.op_match.tolist()
    op_transfer = flat.op_transfer.tolist()
    transfer_ms = flat.transfer_ms.tolist()
    transfer_prev = flat.transfer_prev.tolist()

    post_ms: dict[int, float] = {}
    transfer_end: dict[int, float] = {}
    send_op_of: dict[int, int] = {}
    for o, tr in enumerate(op_transfer):
        send_op_of.setdefault(tr, o)

    def end_of(tr: int) -> float:
        """A transfer starts once both ends posted and its link is free; resolve the FIFO chain forwards."""
        chain = []
        while tr >= 0 and tr not in transfer_end:
            chain.append(tr)
            tr = transfer_prev[tr]
        for t in reversed(chain):
            o = send_op_of[t]
            begin = max(post_ms[o], post_ms[match[o]])
            prev = transfer_prev[t]
            if prev >= 0:
                begin = max(begin, transfer_end[prev])
            transfer_end[t] = begin + transfer_ms[t]
        return transfer_end[chain[0]] if chain else transfer_end[tr]

    start = [0.0] * len(kind)
    end = [0.0] * len(kind)
    clock = [0.0] * pp
    busy = [0.0] * pp
    memory = flat.static_bytes.tolist()
    peak = list(memory)
    events: list[list[tuple[float, float]]] = [[(0.0, m)] for m in memory]
    pc = offsets[:-1]

    def step(r: int, i: int) -> bool:
        """Execute action i of rank r if it can run now; False when it must wait for a peer."""
        t = clock[r]
        if kind[i] == COMPUTE:
            if alloc[i] != 0.0:
                memory[r] += alloc[i]
                peak[r] = max(peak[r], memory[r])
                events[r].append((t, memory[r]))
            start[i], end[i] = t, t + duration[i]
            busy[r] += duration[i]
            clock[r] = end[i]
            if free[i] != 0.0:
                memory[r] -= free[i]
                events[r].append((end[i], memory[r]))
        elif kind[i] == POST:
            if alloc[i] != 0.0:
                memory[r] += alloc[i]
                peak[r] = max(peak[r], memory[r])
                events[r].append((t, memory[r]))
            for o in range(op_lo[i], op_hi[i]):
                post_ms[o] = t
            start[i] = end[i] = t
        else:
            ops = range(op_lo[i], op_hi[i])
            if any(match[o] not in post_ms for o in ops):
                return False
            start[i] = t
            clock[r] = end[i] = max([t] + [end_of(op_transfer[o]) for o in ops])
        return True

    status = OK
    while any(pc[r] < offsets[r + 1] for r in range(pp)):
        moved = False
        for r in range(pp):
            while pc[r] < offsets[r + 1] and step(r, pc[r]):
                pc[r] += 1
                moved = True
        if not moved:
            status = DEADLOCK
            break

    ev_off = flat.event_offsets()
    ev_t = np.zeros(int(ev_off[-1]), np.float64)
    ev_b = np.zeros(int(ev_off[-1]), np.float64)
    for r, evs in enumerate(events):
        lo = int(ev_off[r])
        ev_t[lo : lo + len(evs)] = [e[0] for e in evs]
        ev_b[lo : lo + len(evs)] = [e[1] for e in evs]
    return FlatResult(
        status=status,
        start_ms=np.array(start, np.float64),
        end_ms=np.array(end, np.float64),
        busy_ms=np.array(busy, np.float64),
        peak_bytes=np.array(peak, np.float64),
        event_time_ms=ev_t,
        event_bytes=ev_b,
        event_offsets=ev_off,
        event_count=np.array([len(e) for e in events], np.int64),
        pc=np.array(pc, np.int64),
    )
