# PYTHONUNBUFFERED=1 python benchmarks/packed_step.py --shape 1b --adapters 8 --batch 4 --seq 512
"""One packed step against one solo step, without Ray: where a pack's time goes (issue 17).

`benchmarks/sweep_throughput.py` measures whole sweeps through Tune; this script isolates the engine's inner
loop, `raylora.packed.PackedTrainer.step`, on the same random-init checkpoint and data
(`benchmarks/throughput.py`'s), so that a change to the packed LoRA layers can be measured in a minute:

- `packed`: K adapters (all-linear, r=16 by default, a learning rate each) trained together, `batch` rows of
  `seq` tokens each per step; tokens/s counts every adapter's tokens;
- `solo`: one trial alone through `raylora.training.train` at the same micro-batch (compiled layers, the
  defaults), and `solo-wide` at K x batch rows (what one adapter does with the pack's whole batch: the
  ceiling a pack can approach, since the pack's base matmuls are the same size); `solo-wide-eager` the same
  with `compile="off"` (packed layers run eagerly).

With `--profile` the packed row is also profiled (`benchmarks/step_profile.py`: GPU time by kernel class,
GPU busy against wall) and the host functions that take the most CPU time are listed: a pack whose GPU sits
idle is bound by Python and kernel launches, not by arithmetic.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_profile  # noqa: E402
import throughput as tp  # noqa: E402


def config_for(args, ckpt: Path, data: Path, work: Path, *, lr: float, rank: int, batch: int, name: str):
    from raylora.config import AdapterConfig, DataConfig, FinetuneConfig, ModelConfig, TrainingConfig

    return FinetuneConfig(
        model=ModelConfig(name_or_path=str(ckpt), dtype="bfloat16", attn_implementation="sdpa"),
        data=DataConfig(path=str(data), format="text", max_length=args.seq, eval_fraction=0.05),
        adapter=AdapterConfig(r=rank, alpha=2.0 * rank, dropout=0.05, target_modules=args.targets),
        training=TrainingConfig(
            learning_rate=lr,
            max_steps=args.warmup + args.steps + 4,
            batch_size=batch,
            warmup_steps=0,
            lr_schedule="constant",
            eval_every=10_000,
            eval_batches=1,
            log_every=1,
            checkpoint_every=0,
            output_dir=str(work / name),
            seed=0,
            compile=args.compile,
        ),
    )


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_packed(args, ckpt: Path, data: Path, work: Path) -> dict:
    from raylora.packed import PackedTrainer

    ranks = [int(r) for r in args.ranks.split(",")]
    configs = [
        config_for(
            args,
            ckpt,
            data,
            work,
            lr=1e-4 + i * 2e-5,
            rank=ranks[i % len(ranks)],
            batch=args.batch,
            name=f"a{i}",
        )
        for i in range(args.adapters)
    ]
    started = time.perf_counter()
    trainer = PackedTrainer(configs[0])
    for i, config in enumerate(configs):
        trainer.add(f"trial_{i}", config)
    sync()
    setup = time.perf_counter() - started
    first = time.perf_counter()
    trainer.step()
    sync()
    first_step = time.perf_counter() - first
    for _ in range(args.warmup - 1):
        trainer.step()
    sync()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainer.step()
        sync()
        times.append(time.perf_counter() - t0)
    profile = None
    if args.profile:
        profiler = step_profile.StepProfiler(after=0, active=2)
        with profiler:
            for _ in range(step_profile.StepProfiler.EXTRA_STEPS):
                trainer.step()
                sync()
                profiler.step()
        tokens = args.adapters * args.batch * args.seq
        parts = tp.flops_parts(args.shape, args.targets)
        seq_scale = args.seq / tp.SEQ  # the attention share scales with the sequence length
        flops = tokens * (parts["total"] - parts["attention"] * (1 - seq_scale))
        summary = profiler.summary(
            flops, tokens * parts["attention"] * seq_scale, step_profile.measure_ceilings()
        )
        print(step_profile.format_summary(f"packed x{args.adapters}", summary), flush=True)
        host = sorted(profiler.profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]
        print("host time by op (self CPU ms per step, calls per step):", flush=True)
        for e in host:
            print(f"  {e.key[:70]:70} {e.self_cpu_time_total / 2e3:8.1f} {e.count / 2:8.0f}", flush=True)
        profile = summary
    step = statistics.median(times)
    tokens = args.adapters * args.batch * args.seq
    return {
        "row": f"packed x{args.adapters}",
        "setup_s": setup,
        "first_step_s": first_step,
        "step_s": step,
        "tokens_per_s": tokens / step,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan"),
        "profile": profile,
    }


def run_solo(args, ckpt: Path, data: Path, work: Path, batch: int, label: str) -> dict:
    from raylora.training import train

    config = config_for(
        args, ckpt, data, work, lr=2e-4, rank=int(args.ranks.split(",")[0]), batch=batch, name=label
    )
    reporter = tp._TimingReporter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    train(config, reporter=reporter)
    w, s = args.warmup, args.steps
    seconds = reporter.times[w + s] - reporter.times[w]
    return {
        "row": label,
        "step_s": seconds / s,
        "tokens_per_s": (reporter.seen[w + s] - reporter.seen[w]) / seconds,
        "first_step_s": reporter.times[1] - started,
        "peak_gib": reporter.peak,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1b", choices=sorted(tp.SHAPES))
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--ranks", default="16", help="comma list, cycled over the adapters")
    p.add_argument("--targets", default="all-linear")
    p.add_argument("--compile", default="auto")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rows", default="packed,solo,solo-wide")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", help="append one JSON line per row here")
    args = p.parse_args()
    tp.SEQ = max(tp.SEQ, args.seq)
    root = Path(tempfile.gettempdir()) / "raylora-bench"
    root.mkdir(parents=True, exist_ok=True)
    ckpt = tp.build_checkpoint(args.shape, root)
    data = tp.write_data(root, 2000)
    print(
        f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; torch {torch.__version__}",
        flush=True,
    )
    for row in args.rows.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"packed-step-{row}-"))
        if row == "packed":
            result = run_packed(args, ckpt, data, work)
        elif row == "solo":
            result = run_solo(args, ckpt, data, work, args.batch, "solo")
        elif row in ("solo-wide", "solo-wide-eager"):
            if row.endswith("eager"):
                args.compile, compiled = "off", args.compile
            result = run_solo(args, ckpt, data, work, args.batch * args.adapters, row)
            if row.endswith("eager"):
                args.compile = compiled
        else:
            raise SystemExit(f"--rows: unknown row {row!r}")
        result.update(
            shape=args.shape, adapters=args.adapters, batch=args.batch, seq=args.seq, ranks=args.ranks
        )
        print(
            f"{result['row']:12} step {1e3 * result['step_s']:8.1f} ms  {result['tokens_per_s']:9.0f} tok/s  "
            f"peak {result['peak_gib']:.1f} GiB  first step {result['first_step_s']:.1f} s",
            flush=True,
        )
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(json.dumps({k: v for k, v in result.items() if k != "profile"}) + "\n")
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
