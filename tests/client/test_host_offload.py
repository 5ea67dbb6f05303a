"""The trainer side of activation offloading (`HostStore`): what a forward saves goes to host copies and comes
back for the backward, with the same gradients; the parameters stay put; on a GPU (when one is present) the device
memory of the saved activations is released once the copies are done, and the prefetch overlaps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeweaver.client.offload import HostStore

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.LayerNorm(256), nn.Linear(256, 64), nn.Tanh()).to(device)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def _streams(device: torch.device) -> dict[str, torch.cuda.Stream | None]:
    if device.type != "cuda":
        return {}
    return {"offload_stream": torch.cuda.Stream(device), "prefetch_stream": torch.cuda.Stream(device)}


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("prefetch", [True, False])
def test_gradients_equal_the_run_without_offloading(device_name: str, prefetch: bool) -> None:
    device = torch.device(device_name)
    x = torch.randn(32, 64, device=device)
    plain = _model(device)
    plain(x).square().sum().backward()
    want = _grads(plain)

    model = _model(device)
    store = HostStore(device, model.parameters(), **_streams(device))
    with store.saving():
        loss = model(x).square().sum()
    if prefetch:
        store.prefetch()
    loss.backward()  # without a prefetch the unpack copies back by itself
    got = _grads(model)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)  # copies are exact: the same arithmetic on the same values
    # Activations went to the host (32 rows each); the weights the linear layers save did not.
    assert store.bytes > 0
    assert all(v.size[0] == 32 for v in store._views), [v.size for v in store._views]


class _Twice(nn.Module):
    """Saves one activation five times, once as a transposed view (tanh's output, both operands of a product and of
    a matrix product), and two more twice each."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.up(x))
        left, right = a.chunk(2, dim=1)
        return (a * a).sum() + (a.t() @ a).sum() + (left.sigmoid() * right.exp()).sum()


@pytest.mark.parametrize("device_name", DEVICES)
def test_a_storage_is_copied_once_however_many_of_its_views_are_saved(device_name: str) -> None:
    device = torch.device(device_name)
    torch.manual_seed(1)
    plain = _Twice().to(device)
    x = torch.randn(8, 16, device=device)
    plain(x).backward()
    want = _grads(plain)

    torch.manual_seed(1)
    model = _Twice().to(device)
    store = HostStore(device, model.parameters(), **_streams(device))
    with store.saving():
        loss = model(x)
    loss.backward()
    for g, w in zip(_grads(model), want, strict=True):
        assert torch.equal(g, w)
    # `a` is saved by tanh's backward, by both sides of the product and as `a.t()` and `a` by the matrix product:
    # one copy of its storage serves all five (and the sigmoid's and the exp's outputs, each saved by its own
    # backward and by their product, one copy each).
    a_bytes = 8 * 64 * 4
    copies_of_a = [h for h in store._host if h.numel() * h.element_size() == a_bytes]
    assert len(copies_of_a) == 1, [tuple(h.shape) for h in store._host]
    index = next(i for i, h in enumerate(store._host) if h is copies_of_a[0])
    on_a = [v for v in store._views if v.copy == index]
    assert len(on_a) == 5 and {v.stride for v in on_a} == {(64, 1), (1, 64)}, store._views
    assert store.bytes < 2 * a_bytes + 4 * 8 * 32 * 4  # without sharing: 14,848 bytes (a 5x, the halves 2x each, x)


def test_a_small_view_of_a_large_storage_is_copied_alone() -> None:
    big = torch.randn(1000, 8)
    store = HostStore(torch.device("cpu"))
    with store.saving():
        handle = store._pack(big[:2])
    assert store.bytes == 2 * 8 * 4
    assert torch.equal(store._unpack(handle), big[:2])


def test_addresses_are_forgotten_when_the_forward_ends() -> None:
    """After the forward, the allocator may give an address to another tensor: it must be copied as itself."""
    store = HostStore(torch.device("cpu"))
    with store.saving():
        h1 = store._pack(torch.ones(64))
        assert store._copied  # held while the forward runs: the address cannot be handed out again meanwhile
    assert not store._copied
    with store.saving():
        h2 = store._pack(torch.full((64,), 2.0))
    assert torch.equal(store._unpack(h1), torch.ones(64)) and torch.equal(store._unpack(h2), torch.full((64,), 2.0))


def test_parameters_and_foreign_tensors_stay_in_place() -> None:
    layer = nn.Linear(8, 8)
    store = HostStore(torch.device("cpu"), layer.parameters())
    kept = store._pack(layer.weight)
    assert isinstance(kept, tuple) and kept[0] is layer.weight
    moved = store._pack(torch.ones(3))
    assert moved == 0 and store.bytes == 3 * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_memory_is_released_after_the_copy_and_comes_back_with_the_prefetch() -> None:
    device = torch.device("cuda")
    model = _model(device)
    x = torch.randn(4096, 64, device=device)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    loss = model(x).square().sum()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated(device) - base
    del loss
    torch.cuda.synchronize()
    store = HostStore(device, model.parameters(), **_streams(device))
    with store.saving():
        loss = model(x).square().sum()
    torch.cuda.synchronize()
    offloaded = torch.cuda.memory_allocated(device) - base
    assert offloaded < kept / 4, (offloaded, kept)
    store.prefetch()
    torch.cuda.synchronize()
    back = torch.cuda.memory_allocated(device) - base
    assert back >= kept * 0.5
    loss.backward()
