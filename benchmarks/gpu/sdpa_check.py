"""Why the reference attention is slow on CUDA: SDPA on 3-D (heads, T, d) inputs (what models._attend passes)
vs 4-D (1, heads, T, d), bf16, causal, GQA 16/8, forward + backward. Prints one JSON line.

    python3 benchmarks/gpu/sdpa_check.py
"""

import json

import torch
import torch.nn.functional as F


def bench(shape4: bool, t: int = 4096, h: int = 16, g: int = 8, d: int = 128, reps: int = 10) -> float:
    dev = torch.device("cuda")
    q = torch.randn(h, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(g, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(g, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)

    def step() -> None:
        a, b, c = (q[None], k[None], v[None]) if shape4 else (q, k, v)
        F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True).sum().backward()

    for _ in range(3):
        step()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(reps):
        step()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps


if __name__ == "__main__":
    out = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "T": 4096, "heads": 16, "kv_heads": 8}
    out["fwd_bwd_ms_3d"] = bench(False)
    out["fwd_bwd_ms_4d"] = bench(True)
    print(json.dumps(out), flush=True)
