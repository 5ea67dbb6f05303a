"""Activation offloading on the trainer side: a forward's saved tensors go to host memory, and come back on request.

`HostStore.saving()` wraps one chunk forward in `torch.autograd.graph.saved_tensors_hooks`: every tensor autograd
saves for the backward (except the chunk's parameters, which stay where they are) is copied to pinned host memory
on a side stream as it is saved, and the device copy is released once that copy is done (the caching allocator
waits for the side stream: `record_stream`). `prefetch()` copies them back on a second side stream (host-to-device,
so the two directions overlap) and records an event; the backward's unpack makes the compute stream wait for it,
and copies back by itself if no prefetch came. On a CPU device the "host copy" is a plain copy into fresh CPU
tensors: the same code path, no streams.

A storage is copied once, however many of its views autograd saves: a block of transformer layers saved 2.28 GB
for the 1.61 GB its forward held (the same tensor saved by several operations, views of one buffer;
`benchmarks/gpu/offload_bandwidth.py` on an H200), and the copies, not the compute, bound an offloaded chunk. A
storage is known by its address only while the store holds it: until the forward ends (then every address is
forgotten, so one the allocator hands out again is never mistaken for it). Holding them that long keeps a chunk's
saved activations on the device for its forward, as SEMU counts them (the offload copy starts as they are saved,
and the device copies are released when it is done).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

_Kept = tuple[Tensor]
"""A saved tensor left in place (a parameter, or a tensor not on the device)."""

WHOLE_STORAGE_AT_LEAST = 0.5
"""A saved view covering at least this share of its storage is offloaded as the whole storage (shared with the
storage's other views); a smaller one (a slice of a large buffer) as itself."""


class _View(NamedTuple):
    """A saved tensor as a view of an offloaded storage (`copy`: its index in `HostStore._host`); `dtype` None: the
    copy is the tensor itself."""

    copy: int
    dtype: torch.dtype | None
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class HostStore:
    """The offloaded saved tensors of one forward (one chunk on one sub-microbatch)."""

    def __init__(
        self,
        device: torch.device,
        keep: Iterable[Tensor] = (),
        *,
        offload_stream: torch.cuda.Stream | None = None,
        prefetch_stream: torch.cuda.Stream | None = None,
    ) -> None:
        self.device = device
        self._keep = {t.untyped_storage().data_ptr() for t in keep}
        self._cuda = device.type == "cuda"
        if self._cuda and (offload_stream is None or prefetch_stream is None):
            raise ValueError("offloading on a CUDA device needs an offload stream and a prefetch stream")
        self._out = offload_stream
        self._in = prefetch_stream
        self._host: list[Tensor] = []
        self._views: list[_View] = []
        self._copied: dict[int, tuple[int, torch.UntypedStorage]] = {}
        """The forward's offloaded storages by address: their copy's index, and the storage, held so that the address
        stays theirs (until `saving()` ends)."""
        self._back: list[Tensor] | None = None
        self._ready: torch.cuda.Event | None = None
        self.bytes = 0
        """Bytes copied to the host."""

    @contextmanager
    def saving(self) -> Iterator[None]:
        """Offload what autograd saves inside this block."""
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            # Released: each device copy lives on until its offload is done (`record_stream`), no longer.
            self._copied.clear()

    def _pack(self, t: Tensor) -> int | _Kept:
        storage = t.untyped_storage()
        address = storage.data_ptr()
        if t.device.type != self.device.type or address in self._keep:
            return (t,)
        known = self._copied.get(address)
        if known is not None and known[1].nbytes() == storage.nbytes():
            view = _View(known[0], t.dtype, int(t.storage_offset()), tuple(t.size()), tuple(t.stride()))
        elif t.layout == torch.strided and t.numel() * t.element_size() >= WHOLE_STORAGE_AT_LEAST * storage.nbytes():
            whole = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
            view = _View(self._copy(whole), t.dtype, int(t.storage_offset()), tuple(t.size()), tuple(t.stride()))
            self._copied[address] = (view.copy, storage)
        else:
            view = _View(self._copy(t), None, 0, (), ())
        self._views.append(view)
        return len(self._views) - 1

    def _copy(self, t: Tensor) -> int:
        """Queue `t`'s copy to the host; its index in `_host`."""
        if self._cuda:
            assert self._out is not None
            self._out.wait_stream(torch.cuda.current_stream(self.device))  # t is written on the compute stream
            with torch.cuda.stream(self._out):
                host = torch.empty_like(t, device="cpu", pin_memory=True)
                host.copy_(t, non_blocking=True)
            t.record_stream(self._out)  # its memory is reused only once the copy is done
        else:
            host = t.detach().to("cpu", copy=True)
        self._host.append(host)
        self.bytes += t.numel() * t.element_size()
        return len(self._host) - 1

    def prefetch(self) -> None:
        """Start copying every offloaded tensor back to the device (once; later calls do nothing)."""
        if self._back is not None:
            return
        if self._cuda:
            assert self._in is not None and self._out is not None
            self._in.wait_stream(self._out)  # the copies to the host must be done first
            with torch.cuda.stream(self._in):
                self._back = [h.to(self.device, non_blocking=True) for h in self._host]
                self._ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
                self._ready.record(self._in)
        else:
            self._back = [h.to(self.device, copy=True) for h in self._host]

    def _unpack(self, handle: int | _Kept) -> Tensor:
        if isinstance(handle, tuple):
            return handle[0]
        if self._back is None:
            self.prefetch()  # no prefetch came: copy back now (the backward waits for all of it)
        assert self._back is not None
        if self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready)
            self._ready = None
            for t in self._back:  # used on the compute stream from now on
                t.record_stream(torch.cuda.current_stream(self.device))
        view = self._views[handle]
        back = self._back[view.copy]
        if view.dtype is None:
            return back
        return torch.empty(0, dtype=view.dtype, device=back.device).set_(
            back.untyped_storage(), view.offset, view.size, view.stride
        )

    def release(self) -> None:
        """Drop the host copies and the device copies (after the pair's last backward pass)."""
        self._host.clear()
        self._views.clear()
        self._copied.clear()
        self._back = None
        self._ready = None
