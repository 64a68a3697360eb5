# PYTHONUNBUFFERED=1 python benchmarks/profile_step.py --shape 8b --targets attention,all-linear --impls raylora,raylora-fp8
"""Where a step of raylora's loop spends GPU time, against the matmul floor (torch.profiler).

Trains the throughput benchmark's random-init checkpoint through `raylora.training.train` for each raylora
impl of benchmarks/throughput.py (the loop's defaults: `raylora`; `raylora-fp8`, `raylora-liger-ce`, ...),
profiles two steps after three warm-up steps (compilation happens in those), and prints, per run, the GPU
time per step by kernel class (matmul, attention, elementwise/fused, ...) against the floor of the step's
FLOPs over the matmul rate measured on this GPU (benchmarks/step_profile.py), then the `--top` kernels.

throughput.py `--profile IMPL` profiles the same way inside a throughput row (three extra steps after the
timed ones), which saves loading and compiling the model twice; this script is the standalone form.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_profile  # noqa: E402
import throughput as tp  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8b")
    p.add_argument("--targets", default="attention", help="comma list of attention, all-linear")
    p.add_argument("--mode", default="lora")
    p.add_argument(
        "--impls", default="raylora", help="comma list of throughput.py's in-process raylora impls"
    )
    p.add_argument("--seq", type=int, default=tp.SEQ)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "raylora-bench"))
    a = p.parse_args()
    impls = [tp.parse_impl(name) for name in a.impls.split(",")]
    for impl in impls:
        if impl.loop != "raylora" or impl.family != "main":
            p.error(f"--impls: {impl.name} is not a raylora impl that runs in this process")
    tp.SEQ = a.seq
    root = Path(a.workdir)
    root.mkdir(parents=True, exist_ok=True)
    ckpt = tp.build_checkpoint(a.shape, root)
    data = tp.write_data(root, records=256)
    ceilings = step_profile.measure_ceilings()
    warmup = 3
    for targets in a.targets.split(","):
        for impl in impls:
            profiler = step_profile.StepProfiler(after=warmup)
            with profiler:
                work = Path(tempfile.mkdtemp(dir=root))
                tp.run_raylora(
                    a.shape,
                    targets,
                    a.mode,
                    ckpt,
                    data,
                    warmup,
                    1,
                    work,
                    hook=profiler.step,
                    extra_steps=step_profile.StepProfiler.EXTRA_STEPS - 1,
                    **impl.options,
                )
            parts = tp.flops_parts(a.shape, targets)
            tokens = tp.SHAPES[a.shape]["batch"] * tp.SEQ
            summary = profiler.summary(
                parts["total"] * tokens,
                parts["attention"] * tokens,
                ceilings,
                fp8_frozen_flops_per_step=parts["frozen_decoder"] * tokens if impl.fp8 else 0.0,
            )
            sort = "self_cuda_time_total" if tp.CUDA else "self_cpu_time_total"
            tp.log(
                profiler.profiler.key_averages().table(
                    sort_by=sort, row_limit=a.top, max_name_column_width=80
                )
            )
            tp.log(step_profile.format_summary(f"{a.shape} {targets} {a.mode} {impl.name}", summary))


if __name__ == "__main__":
    main()
