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
    assert all(t.shape[0] == 32 for t in store._host), [tuple(t.shape) for t in store._host]


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
