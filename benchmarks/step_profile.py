"""Where the GPU time of a training step goes, against the matmul floor (issue 18).

`StepProfiler` records a few steps of any loop that calls its `step()` once per optimizer step (raylora's
reporter, a `transformers` callback): it waits `after` steps (the timed ones, so the profiler does not
perturb them), then records one warm-up and `active` steps. `summary` puts every GPU kernel into one of a
few classes by its name (matmul, attention, elementwise/fused, 4-bit dequantisation, optimizer, copies,
other), and sets the step against two floors:

- the matmul floor: the step's model FLOPs (throughput.py's count: forward + input-gradient matmuls of the
  frozen weights, the adapters' three products, attention) over the bf16 matmul rate measured on this GPU
  (`measure_ceilings`), i.e. the step time if every FLOP ran at the rate of a large bf16 matmul;
- with FP8 base layers, the frozen matmuls' share over the measured FP8 rate instead.

Kernel classes come from names (cuBLAS `nvjet`/`sm90_xmma`/`cutlass` GEMMs, cuDNN/flash attention, Triton
`triton_*` fusions, ...); the kernels that matched no class are listed so that a wrong class shows.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

CLASSES = ("matmul", "attention", "elementwise/fused", "dequant 4-bit", "optimizer", "copy/fill", "other")

_ATTENTION = ("flash", "fmha", "sdpa", "attention", "attn")
_MATMUL = ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "splitk", "scaled_mm", "wgmma", "_mm_")
_ELEMENTWISE = (
    "elementwise",
    "norm",
    "rope",
    "rotary",
    "swiglu",
    "silu",
    "cross_entropy",
    "vectorized",
    "reduce",
    "unrolled",
    "softmax",
    "dropout",
    "_kernel",
    "cat",
    "index",
    "scatter",
    "gather",
)


def kernel_class(name: str) -> str:
    n = name.lower()
    if any(k in n for k in _ATTENTION):
        return "attention"
    if any(k in n for k in _MATMUL):
        return "matmul"
    if n.startswith("triton_"):  # inductor's fused kernels (its matmul templates matched above)
        return "elementwise/fused"
    if "dequantize" in n or "kdequant" in n:
        return "dequant 4-bit"
    if "adam" in n or "multi_tensor" in n or "foreach" in n:
        return "optimizer"
    if "memcpy" in n or "memset" in n or "fill" in n or "copy" in n:
        return "copy/fill"
    if any(k in n for k in _ELEMENTWISE):
        return "elementwise/fused"
    return "other"


def measure_ceilings(size: int = 8192, iters: int = 10) -> dict[str, float]:
    """bf16 and FP8 (e4m3, per-tensor scales) matmul rates on this GPU, FLOP/s: the mean of `iters` products
    of two random `size` x `size` matrices after three warm-ups."""
    if not torch.cuda.is_available():
        return {}
    out = {"bf16": _matmul_rate(size, iters, fp8=False)}
    if torch.cuda.get_device_capability() >= (8, 9):
        out["fp8"] = _matmul_rate(size, iters, fp8=True)
    torch.cuda.empty_cache()
    return out


def _matmul_rate(size: int, iters: int, *, fp8: bool) -> float:
    x = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    if fp8:
        x8, y8 = x.to(torch.float8_e4m3fn), y.to(torch.float8_e4m3fn).t().contiguous().t()  # y8 column-major
        one = torch.ones((), device="cuda")

        def product():
            return torch._scaled_mm(x8, y8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    else:

        def product():
            return x @ y

    for _ in range(3):
        product()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        product()
    torch.cuda.synchronize()
    return 2 * size**3 * iters / (time.perf_counter() - start)


class StepProfiler:
    """torch.profiler over `active` optimizer steps that follow the first `after` steps (and one warm-up)."""

    EXTRA_STEPS = 3  # one profiler warm-up step + two recorded steps, run after the timed ones

    def __init__(self, after: int, active: int = 2):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.active = active
        self.profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=after, warmup=1, active=active, repeat=1),
        )

    def __enter__(self) -> StepProfiler:
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.profiler.__exit__(*exc)

    def step(self) -> None:
        self.profiler.step()

    def summary(
        self,
        flops_per_step: float,
        attention_flops_per_step: float,
        ceilings: dict[str, float],
        fp8_frozen_flops_per_step: float = 0.0,
    ) -> dict:
        """Device time per step by kernel class, the step's wall time, and the floors (see the module)."""
        by_class: dict[str, float] = defaultdict(float)
        by_kernel: dict[str, float] = defaultdict(float)
        step_wall_us = 0.0
        # Raw events, not key_averages(): the averages merge a step's CPU range with its GPU-side annotation.
        for event in self.profiler.events():
            on_device = str(event.device_type).endswith("CUDA")
            if event.name.startswith("ProfilerStep"):
                if not on_device:
                    step_wall_us += event.time_range.elapsed_us()
                continue
            # kernels only: a record_function range mirrored on the GPU spans kernels counted on their own
            if not on_device or getattr(event, "is_user_annotation", False):
                continue
            device_us = float(event.time_range.elapsed_us())
            by_class[kernel_class(event.name)] += device_us
            by_kernel[event.name] += device_us
        steps = self.active
        per_step = {k: v / steps / 1e3 for k, v in by_class.items()}  # ms
        busy = sum(per_step.values())
        wall = step_wall_us / steps / 1e3 if step_wall_us else float("nan")
        bf16 = ceilings.get("bf16", float("nan"))
        fp8 = ceilings.get("fp8", bf16)
        floor = (flops_per_step - fp8_frozen_flops_per_step) / bf16 + fp8_frozen_flops_per_step / fp8
        matmul_flops = flops_per_step - attention_flops_per_step
        matmul_ms = per_step.get("matmul", 0.0)
        top_other = sorted(
            ((k, v) for k, v in by_kernel.items() if kernel_class(k) == "other"), key=lambda kv: -kv[1]
        )[:5]
        top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:10]
        return {
            "steps": steps,
            "wall_ms": wall,
            "busy_ms": busy,
            "class_ms": {k: per_step.get(k, 0.0) for k in CLASSES},
            "floor_ms": 1e3 * floor,
            "matmul_tflops": matmul_flops / (matmul_ms / 1e3) / 1e12 if matmul_ms else float("nan"),
            "ceilings_tflops": {k: v / 1e12 for k, v in ceilings.items()},
            "top_kernels_ms": [(k[:90], v / steps / 1e3) for k, v in top],
            "top_other_ms": [(k[:90], v / steps / 1e3) for k, v in top_other],
        }


def format_summary(label: str, s: dict) -> str:
    """A compact table of one profile summary."""
    wall, busy, floor = s["wall_ms"], s["busy_ms"], s["floor_ms"]
    lines = [
        f"profile {label}: {s['steps']} steps; step {wall:.1f} ms wall, GPU busy {busy:.1f} ms "
        f"({100 * busy / wall:.0f}%); matmul floor {floor:.1f} ms (step / floor {wall / floor:.2f}x); "
        f"matmul kernels {s['matmul_tflops']:.0f} TFLOP/s of model matmul FLOPs; measured ceilings "
        + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in s["ceilings_tflops"].items()),
        f"  {'class':18} {'ms/step':>8} {'% busy':>7}",
    ]
    for name, ms in s["class_ms"].items():
        lines.append(f"  {name:18} {ms:8.1f} {100 * ms / busy if busy else 0:6.1f}%")
    lines.append("  top kernels: " + "; ".join(f"{k} {v:.1f} ms" for k, v in s["top_kernels_ms"][:6]))
    if s["top_other_ms"]:
        lines.append("  unclassified: " + "; ".join(f"{k} {v:.2f} ms" for k, v in s["top_other_ms"]))
    return "\n".join(lines)
