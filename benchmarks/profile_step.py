# PYTHONUNBUFFERED=1 python benchmarks/profile_step.py --shape 8b --targets attention
"""Where a step of raylora's loop spends GPU time: the top kernels of two profiled steps (torch.profiler).

Trains the throughput benchmark's random-init checkpoint through `raylora.training.train` (the loop's defaults),
profiles two steps after three warm-up steps (compilation included in those), and prints the kernels that
took the most device time, grouped by name, with their share of the profiled steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402


class _ProfilingReporter(tp._TimingReporter):
    def __init__(self, profiler: torch.profiler.profile):
        super().__init__()
        self.profiler = profiler

    def report(self, metrics, *, checkpoint_dir=None):
        super().report(metrics, checkpoint_dir=checkpoint_dir)
        if "eval_loss" not in metrics:
            self.profiler.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8b")
    p.add_argument("--targets", default="attention")
    p.add_argument("--mode", default="lora")
    p.add_argument("--seq", type=int, default=tp.SEQ)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "raylora-bench"))
    a = p.parse_args()
    tp.SEQ = a.seq
    root = Path(a.workdir)
    root.mkdir(parents=True, exist_ok=True)
    ckpt = tp.build_checkpoint(a.shape, root)
    data = tp.write_data(root, records=256)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if tp.CUDA:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=3, warmup=1, active=2, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule) as profiler:
        work = Path(tempfile.mkdtemp(dir=root))
        tp.run_raylora(
            a.shape,
            a.targets,
            a.mode,
            ckpt,
            data,
            3,
            3,
            work,
            v0=False,
            reporter=_ProfilingReporter(profiler),
        )
    sort = "self_cuda_time_total" if tp.CUDA else "self_cpu_time_total"
    tp.log(profiler.key_averages().table(sort_by=sort, row_limit=a.top, max_name_column_width=80))


if __name__ == "__main__":
    main()
