"""CUDA settings that point-to-point pipelines with dynamic shapes need before the first CUDA call.

CUDA loads kernels lazily by default (``CUDA_MODULE_LOADING=LAZY``, CUDA 11.7+): the first launch of a kernel that
is not loaded yet waits, holding the context lock, for the GPU's queued work to drain. A pipeline rank usually
has NCCL receives in flight that wait for a peer, and that peer may be waiting for this rank's next send, which the
host posts only after the launch that is now stuck: a deadlock. With fixed shapes every kernel is loaded in the
first iteration; with per-batch shapes (every PipeWeaver plan) a new token count can pick a new GEMM or attention
kernel in any iteration. On 4 GPUs, searched plans stopped in their second iteration this way (every rank
waiting on a receive, no error), and a baseline with varying shapes after 27 iterations. Loading every kernel when
the context is created removes the hazard at the cost of a slower start.
"""

from __future__ import annotations

import os
import warnings

MODULE_LOADING = "CUDA_MODULE_LOADING"


def require_eager_module_loading() -> None:
    """Set ``CUDA_MODULE_LOADING=EAGER`` for this process unless the user chose a value. Call it before the first
    CUDA call (the driver reads it once, when it initialises)."""
    os.environ.setdefault(MODULE_LOADING, "EAGER")


def warn_if_lazy_module_loading() -> None:
    """Warn when NCCL pipelines run with lazy kernel loading (see the module docstring)."""
    mode = os.environ.get(MODULE_LOADING, "LAZY").upper()
    if mode != "EAGER":
        warnings.warn(
            f"{MODULE_LOADING}={mode}: a kernel loaded for the first time while NCCL receives wait can deadlock a "
            f"pipeline with per-batch shapes; set {MODULE_LOADING}=EAGER before CUDA starts "
            "(pipeweaver.client.cuda_env.require_eager_module_loading())",
            RuntimeWarning,
            stacklevel=3,
        )
