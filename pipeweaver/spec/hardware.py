"""Accelerator presets with datasheet numbers (dense bf16, no sparsity)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeweaver.errors import require

GB = 1e9
GiB = 1024**3


@dataclass(frozen=True, kw_only=True, slots=True)
class HardwareSpec:
    """One accelerator and its links, as a roofline model sees them."""

    name: str
    peak_flops: float
    """Dense bf16 tensor-core FLOP/s (fp32 FLOP/s for the cpu preset)."""
    hbm_bandwidth: float
    """Device memory bandwidth in bytes/s."""
    memory_bytes: float
    """Device memory capacity in bytes."""
    nvlink_bandwidth: float
    """Per-GPU, per-direction bandwidth to a GPU in the same node, bytes/s."""
    internode_bandwidth: float
    """Per-GPU, per-direction bandwidth to a GPU in another node, bytes/s."""
    gpus_per_node: int = 8
    p2p_latency_s: float = 10e-6
    """Fixed cost of one point-to-point transfer (launch + synchronisation)."""
    dtype_bytes: int = 2
    """Bytes per activation element of the training dtype (bf16: 2; cpu/gloo float32: 4)."""
    host_link_bandwidth: float = 26 * GB
    """Per-GPU, per-direction bandwidth between device and pinned host memory, bytes/s, with every GPU of the node
    copying at once: what activation offloading gets. A PCIe Gen5 x16 link moves ~50-55 GB/s per direction for
    one GPU alone, but HGX H100/H800 boards put two GPUs (and their NICs) behind one Gen5 x16 switch uplink to the
    CPU, and pipeline ranks offload at the same time, so the default is half of that: 26 GB/s. Eight GPUs moving
    26 GB/s each way also take ~420 GB/s of a two-socket host's DRAM bandwidth, about all of it."""
    host_memory_bytes: float = 200 * GB
    """Pinned host memory one GPU may fill with offloaded activations: a DGX/HGX H100 or H800 node has 2 TB of
    host memory for 8 GPUs (256 GB each), less the OS, data loading and the runtime's own buffers."""

    def __post_init__(self) -> None:
        for name in (
            "peak_flops",
            "hbm_bandwidth",
            "memory_bytes",
            "nvlink_bandwidth",
            "internode_bandwidth",
            "host_link_bandwidth",
            "host_memory_bytes",
        ):
            value = getattr(self, name)
            require(value > 0, f"hardware '{self.name}': {name} must be positive, got {value}")
        require(self.gpus_per_node >= 1, f"hardware '{self.name}': gpus_per_node must be at least 1")
        require(self.p2p_latency_s >= 0, f"hardware '{self.name}': p2p_latency_s must not be negative")
        require(self.dtype_bytes in (2, 4), f"hardware '{self.name}': dtype_bytes must be 2 or 4")

    def link_bandwidth(self, rank_a: int, rank_b: int, *, ranks_per_node: int | None = None) -> float:
        """Bandwidth between two global GPU indices: NVLink inside a node, the network across."""
        per_node = ranks_per_node or self.gpus_per_node
        same_node = rank_a // per_node == rank_b // per_node
        return self.nvlink_bandwidth if same_node else self.internode_bandwidth


H100_SXM = HardwareSpec(
    name="h100-sxm",
    peak_flops=989.4e12,
    hbm_bandwidth=3.35e12,
    memory_bytes=80 * GB,
    nvlink_bandwidth=450 * GB,  # NVLink 4: 900 GB/s bidirectional
    internode_bandwidth=50 * GB,  # 400 Gb/s NDR per GPU
)
H800 = HardwareSpec(
    name="h800",
    peak_flops=989.4e12,
    hbm_bandwidth=3.35e12,
    memory_bytes=80 * GB,
    nvlink_bandwidth=200 * GB,  # the paper's testbed: 200 GB/s NVLink (400 GB/s bidirectional)
    internode_bandwidth=25 * GB,  # 8 x 200 Gb/s RoCE per node, rail-optimised: 200 Gb/s per GPU
)
H20 = HardwareSpec(
    name="h20",
    peak_flops=148e12,
    hbm_bandwidth=4.0e12,
    memory_bytes=96 * GB,
    nvlink_bandwidth=450 * GB,
    internode_bandwidth=50 * GB,
)
A100_80GB = HardwareSpec(
    name="a100-80gb",
    peak_flops=312e12,
    hbm_bandwidth=2.039e12,
    memory_bytes=80 * GB,
    nvlink_bandwidth=300 * GB,  # NVLink 3: 600 GB/s bidirectional
    internode_bandwidth=25 * GB,  # 200 Gb/s HDR per GPU
)
CPU = HardwareSpec(
    name="cpu",
    # One torch thread per gloo rank on a laptop-class core: a few tens of fp32 GFLOP/s. Calibrated, not datasheet.
    peak_flops=50e9,
    hbm_bandwidth=10 * GB,
    memory_bytes=24 * GiB,
    nvlink_bandwidth=2 * GB,  # gloo over loopback TCP
    internode_bandwidth=1 * GB,
    gpus_per_node=64,
    p2p_latency_s=100e-6,
    dtype_bytes=4,
)

HARDWARE_PRESETS: dict[str, HardwareSpec] = {h.name: h for h in (H100_SXM, H800, H20, A100_80GB, CPU)}


def hardware_preset(name: str) -> HardwareSpec:
    try:
        return HARDWARE_PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown hardware '{name}'; choose one of {sorted(HARDWARE_PRESETS)}") from None
