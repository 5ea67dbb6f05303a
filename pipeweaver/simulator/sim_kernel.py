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
PREFETCH = 3
"""Action kind: start copying an offloaded pair's activations back from host memory (takes no time on the rank;
the copy queues on the rank's host-to-device direction)."""

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
    offload_ms: FloatArray | None = None
    """Per action, the device-to-host copy time of an offloading forward's activations (-1: none). The copy starts
    when the forward ends and its rank's D2H direction is free (FIFO); the bytes are freed when it ends. None: no
    action offloads (every offload array below is None too)."""
    reload_ms: FloatArray | None = None
    """Per action, the host-to-device copy time of a reloading backward (the first backward pass of an offloaded
    pair; 0: none)."""
    reload_of: IntArray | None = None
    """Per action, the offloading forward whose activations a reloading backward brings back (-1: none)."""
    prefetch_of: IntArray | None = None
    """Per PREFETCH action, the reloading backward it prefetches for (-1 otherwise). A reloading backward without
    one issues its own copy when it is reached, and waits for all of it."""
    host_bytes: FloatArray | None = None
    """Per action, the bytes an offloading forward frees when its copy ends, or a reloading backward allocates
    when its prefetch is issued (memory events of the copies; see `merge_host_events`)."""

    @property
    def offloads(self) -> bool:
        return self.offload_ms is not None

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
    d2h_end_ms: FloatArray | None = None
    """Per action, when an offloading forward's device-to-host copy ended (its bytes are freed then)."""
    reload_issue_ms: FloatArray | None = None
    """Per action, when a reloading backward's prefetch was issued (its bytes are allocated then)."""


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


def _issue(
    b: int,
    r: int,
    t: float,
    issued: Any,
    h2d_free: Any,
    h2d_end: Any,
    d2h_end: Any,
    reload_of: Any,
    reload_ms: Any,
    reload_issue: Any,
) -> None:  # pragma: no cover - numba
    """Issue backward b's copy back at t: it starts once its offload copy and rank r's earlier copies back end."""
    issued[b] = True
    begin = max(t, h2d_free[r], d2h_end[reload_of[b]])
    h2d_end[b] = begin + reload_ms[b]
    h2d_free[r] = h2d_end[b]
    reload_issue[b] = t


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
    offload_ms: Any,
    reload_ms: Any,
    reload_of: Any,
    prefetch_of: Any,
    d2h_end: Any,
    reload_issue: Any,
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
    # Host link per rank, one FIFO per direction: when each is next free; per reloading action, its copy's end.
    d2h_free = np.zeros(pp, np.float64)
    h2d_free = np.zeros(pp, np.float64)
    h2d_end = np.zeros(kind.shape[0], np.float64)
    issued = np.zeros(kind.shape[0], np.bool_)  # per reloading backward: its copy back has been issued
    offloads = offload_ms.shape[0] > 0
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
                    if offloads and reload_of[i] >= 0:
                        if not issued[i]:  # no prefetch: the copy starts now
                            _issue(i, r, t, issued, h2d_free, h2d_end, d2h_end, reload_of, reload_ms, reload_issue)
                        if h2d_end[i] > t:
                            t = h2d_end[i]  # the backward waits for its copy
                    start_ms[i] = t
                    if alloc_bytes[i] != 0.0:
                        _record(r, alloc_bytes[i], t, mem)
                    t = t + duration_ms[i]
                    busy_ms[r] += duration_ms[i]
                    end_ms[i] = t
                    if free_bytes[i] != 0.0:  # memory only falls: the peak check inside is a no-op
                        _record(r, -free_bytes[i], t, mem)
                    if offloads and offload_ms[i] >= 0.0:
                        begin = max(t, d2h_free[r])
                        d2h_end[i] = begin + offload_ms[i]
                        d2h_free[r] = d2h_end[i]
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
                elif k == 3:  # PREFETCH
                    b = prefetch_of[i]
                    if b >= 0 and not issued[b]:
                        _issue(b, r, t, issued, h2d_free, h2d_end, d2h_end, reload_of, reload_ms, reload_issue)
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

    _record = numba.njit(cache=True)(_record)  # before the kernel: it calls the compiled helpers by these names
    _issue = numba.njit(cache=True)(_issue)
    _numba_kernel = numba.njit(cache=True)(_kernel)  # one signature: int64 and float64 arrays only
except ModuleNotFoundError:  # the trainer side installs no numba; it never simulates
    _numba_kernel = None


def run_numba(flat: FlatPlan) -> FlatResult:
    """Run the numba kernel (compiled on first use, cached on disk; set NUMBA_CACHE_DIR in containers)."""
    if _numba_kernel is None:
        raise ModuleNotFoundError("numba is missing: pip install 'pipeweaver[server]', or use_numba=False")
    start, end, busy, peak, ev_t, ev_b, ev_off, ev_n, pc = _outputs(flat)
    n = flat.num_actions
    d2h_end = np.zeros(n if flat.offloads else 0, np.float64)
    reload_issue = np.zeros(n if flat.offloads else 0, np.float64)
    f0, i0 = np.zeros(0, np.float64), np.zeros(0, np.int64)
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
        flat.offload_ms if flat.offload_ms is not None else f0,
        flat.reload_ms if flat.reload_ms is not None else f0,
        flat.reload_of if flat.reload_of is not None else i0,
        flat.prefetch_of if flat.prefetch_of is not None else i0,
        d2h_end,
        reload_issue,
    )
    if not flat.offloads:
        return FlatResult(int(status), start, end, busy, peak, ev_t, ev_b, ev_off, ev_n, pc)
    return FlatResult(int(status), start, end, busy, peak, ev_t, ev_b, ev_off, ev_n, pc, d2h_end, reload_issue)


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

    offloads = flat.offloads
    offload_ms = flat.offload_ms.tolist() if flat.offload_ms is not None else []
    reload_ms = flat.reload_ms.tolist() if flat.reload_ms is not None else []
    reload_of = flat.reload_of.tolist() if flat.reload_of is not None else []
    prefetch_of = flat.prefetch_of.tolist() if flat.prefetch_of is not None else []
    d2h_free = [0.0] * pp  # each rank's host link, one FIFO per direction
    h2d_free = [0.0] * pp
    d2h_end = [0.0] * len(kind)
    h2d_end: dict[int, float] = {}  # per reloading backward whose copy back was issued, when that copy ends
    reload_issue = [0.0] * len(kind)

    def issue(b: int, r: int, t: float) -> None:
        h2d_end[b] = max(t, h2d_free[r], d2h_end[reload_of[b]]) + reload_ms[b]
        h2d_free[r] = h2d_end[b]
        reload_issue[b] = t

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
            if offloads and reload_of[i] >= 0:
                if i not in h2d_end:
                    issue(i, r, t)
                t = max(t, h2d_end[i])
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
            if offloads and offload_ms[i] >= 0.0:
                d2h_end[i] = max(end[i], d2h_free[r]) + offload_ms[i]
                d2h_free[r] = d2h_end[i]
        elif kind[i] == PREFETCH:
            b = prefetch_of[i]
            if b >= 0 and b not in h2d_end:
                issue(b, r, t)
            start[i] = end[i] = t
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
        d2h_end_ms=np.array(d2h_end, np.float64) if offloads else None,
        reload_issue_ms=np.array(reload_issue, np.float64) if offloads else None,
    )


# ---- host-copy memory events -------------------------------------------------------------------------------


def merge_host_events(flat: FlatPlan, out: FlatResult) -> FlatResult:
    """`out` with the memory events of host copies merged into each rank's timeline, in time order.

    The kernels record a rank's memory in the order its actions run, which is time order; an offloaded forward's
    bytes are freed later, when its device-to-host copy ends, and a reloading backward's bytes come back when its
    prefetch is issued, before it starts. Those events land here, as changes on top of the action timeline (a
    stable sort by time, so equal times keep the actions' events first); the peak is the largest merged level.
    """
    if not flat.offloads or out.d2h_end_ms is None or out.reload_issue_ms is None:
        return out
    assert flat.offload_ms is not None and flat.reload_of is not None and flat.host_bytes is not None
    host = flat.host_bytes
    offloading = np.flatnonzero(flat.offload_ms >= 0.0)
    reloading = np.flatnonzero(flat.reload_of >= 0)
    rank_of = np.repeat(np.arange(flat.pp), np.diff(flat.rank_offsets))
    times: list[FloatArray] = []
    levels: list[FloatArray] = []
    peak = np.zeros(flat.pp, np.float64)
    for r in range(flat.pp):
        lo, n = int(out.event_offsets[r]), int(out.event_count[r])
        t0, b0 = out.event_time_ms[lo : lo + n], out.event_bytes[lo : lo + n]
        delta0 = np.diff(b0, prepend=0.0)
        frees = offloading[rank_of[offloading] == r]
        frees = frees[out.pc[r] > frees]  # only copies that ran (a deadlocked run stops early)
        loads = reloading[rank_of[reloading] == r]
        loads = loads[out.pc[r] > loads]
        t = np.concatenate((t0, out.d2h_end_ms[frees], out.reload_issue_ms[loads]))
        d = np.concatenate((delta0, -host[frees], host[loads]))
        order = np.argsort(t, kind="stable")
        level = np.cumsum(d[order])
        times.append(t[order])
        levels.append(level)
        peak[r] = float(level.max()) if level.size else 0.0
    counts = np.array([len(t) for t in times], np.int64)
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    return FlatResult(
        status=out.status,
        start_ms=out.start_ms,
        end_ms=out.end_ms,
        busy_ms=out.busy_ms,
        peak_bytes=peak,
        event_time_ms=np.concatenate(times) if times else np.zeros(0),
        event_bytes=np.concatenate(levels) if levels else np.zeros(0),
        event_offsets=offsets,
        event_count=counts,
        pc=out.pc,
        d2h_end_ms=out.d2h_end_ms,
        reload_issue_ms=out.reload_issue_ms,
    )
