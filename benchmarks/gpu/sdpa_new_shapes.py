"""What a batch shape seen for the first time costs in scaled_dot_product_attention, per SDPA backend choice.

Per-batch plans change the token and image counts every iteration. A backend that builds (or compiles) a kernel
plan per shape pays that on the host the first time a shape appears, and a runtime kernel load waits for the GPU
to drain (with NCCL receives in flight that is a deadlock, see pipeweaver/client/cuda_env.py). This times forward
+ backward of the ViT's batched attention (n images x 576 patches, 16 heads, d 64) and the LM's packed causal
attention (GQA 16/8, d 128, T tokens) at shapes never seen before, then again at the same shapes, with the cuDNN
backend allowed (torch's default order) and with it disabled. One JSON line to stdout.

    python3 benchmarks/gpu/sdpa_new_shapes.py
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F


def _vit(n: int) -> None:
    q, k, v = (torch.randn(n, 16, 576, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    F.scaled_dot_product_attention(q, k, v).sum().backward()


def _lm(t: int) -> None:
    q = torch.randn(1, 16, t, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 8, t, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()


def _pass(fn: object, sizes: list[int]) -> list[float]:
    out = []
    for s in sizes:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(s)  # type: ignore[operator]
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    result: dict[str, object] = {
        "benchmark": "sdpa_new_shapes",
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    _vit(1), _lm(256)  # context, cuBLAS and allocator start-up out of the way
    for label, cudnn, offset in (("cudnn_allowed", True, 0), ("cudnn_disabled", False, 1)):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        # Different sizes per setting (offset), so each setting meets shapes it has never seen.
        vit_sizes = [2 * i + offset + 2 for i in range(10)]
        lm_sizes = [1024 + 96 * i + 8 * offset for i in range(10)]
        first = _pass(_vit, vit_sizes) + _pass(_lm, lm_sizes)
        again = _pass(_vit, vit_sizes) + _pass(_lm, lm_sizes)
        result[label] = {
            "new_shape_ms_mean": sum(first) / len(first),
            "new_shape_ms_max": max(first),
            "seen_shape_ms_mean": sum(again) / len(again),
            "vit_images": vit_sizes,
            "lm_tokens": lm_sizes,
        }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
