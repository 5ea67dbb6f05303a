"""CUDA settings that point-to-point pipelines with dynamic shapes need before the first CUDA call.

CUDA loads kernels lazily by default (``CUDA_MODULE_LOADING=LAZY``, CUDA 11.7+): the first launch of a kernel that
is not loaded yet waits, holding the context lock, for the GPU's queued work to drain. A pipeline rank usually
has NCCL receives in flight that wait for a peer, and that peer may be waiting for this rank's next send, which the
host posts only after the launch that is now stuck: a deadlock. With fixed shapes every kernel is loaded in the
first iteration; with per-batch shapes (every PipeWeaver plan) a new token count can pick a new GEMM or attention
kernel in any iteration. Loading every kernel when the context is created removes that part of the hazard at the
cost of a slower start.

Kernels built at run time are not covered by eager loading: cuDNN's attention backend builds an execution plan for
every new shape on the host (its first-shape cost, measured by benchmarks/gpu/sdpa_new_shapes.py) and loads it.
On 4 H200s with eager loading, searched plans still stopped in their second iteration with one rank's host inside
scaled_dot_product_attention on an idle device and the others waiting on receives, and a repeated batch ran in
0.7 s where its first run took 2.2 s. So dynamic pipelines also keep attention on flash / memory-efficient kernels.
"""

from __future__ import annotations

import os
import warnings

MODULE_LOADING = "CUDA_MODULE_LOADING"


def require_eager_module_loading() -> None:
    """Set ``CUDA_MODULE_LOADING=EAGER`` for this process unless the user chose a value. Call it before the first
    CUDA call (the driver reads it once, when it initialises)."""
    os.environ.setdefault(MODULE_LOADING, "EAGER")


def warn_if_unprepared_for_dynamic_pipelines() -> None:
    """Warn when NCCL pipelines run with lazy kernel loading or cuDNN attention (see the module docstring)."""
    import torch

    if torch.backends.cuda.cudnn_sdp_enabled():  # type: ignore[no-untyped-call]
        warnings.warn(
            "cuDNN attention is enabled: it builds a kernel plan per new shape, slow and deadlock-prone with per-batch "
            "shapes; call pipeweaver.client.cuda_env.prepare_cuda_for_dynamic_pipelines() first",
            RuntimeWarning,
            stacklevel=3,
        )
    mode = os.environ.get(MODULE_LOADING, "LAZY").upper()
    if mode != "EAGER":
        warnings.warn(
            f"{MODULE_LOADING}={mode}: a kernel loaded for the first time while NCCL receives wait can deadlock a "
            f"pipeline with per-batch shapes; set {MODULE_LOADING}=EAGER before CUDA starts "
            "(pipeweaver.client.cuda_env.require_eager_module_loading())",
            RuntimeWarning,
            stacklevel=3,
        )


def prefer_shape_generic_attention() -> None:
    """Keep scaled_dot_product_attention off the cuDNN backend, which builds a kernel plan per new shape on the host
    (and may load it at run time); flash and memory-efficient attention are compiled ahead for every shape."""
    import torch

    torch.backends.cuda.enable_cudnn_sdp(False)


def prepare_cuda_for_dynamic_pipelines() -> None:
    """Both settings above; call before the first CUDA call."""
    require_eager_module_loading()
    prefer_shape_generic_attention()
