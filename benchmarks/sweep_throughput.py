# PYTHONUNBUFFERED=1 python benchmarks/sweep_throughput.py --shape 1b --trials 8 --steps 100 --batch 4 --seq 512 --modes gpu,fraction,packed
"""Whole-sweep throughput on one GPU: one trial per GPU, fractional GPUs, and packed trials, side by side.

Each mode runs the same sweep through `run_sweep` (a grid over the learning rate, `trials` trials of
`steps` steps, all-linear LoRA r=16 on a random-init Llama checkpoint, random-letter text) in this
process's local Ray cluster:

- `gpu`: `Resources(gpus_per_worker=1)`, `pack=False`: one trial at a time holds the GPU;
- `fraction`: `gpus_per_worker=1/concurrency`, `pack=False`: that many trials share the GPU, each with its
  own copy of the base;
- `packed`: `gpus_per_worker=1`, `pack=K`: one engine holds the base once and trains up to K adapters
  together (`raylora.sweep.packing`).

It prints, per mode: the sweep's wall time (makespan), all tokens trained (the trials' `tokens_seen`),
sweep tokens/s (tokens over wall time), the steady tokens/s of one trial alone (the `gpu` mode's median
train-window rate) and the ratio of the two, the per-trial fixed cost (`setup_time_s`: load, tokenize, wrap,
before the first step), peak device memory (nvidia-smi, sampled every 0.2 s over the whole mode: every
co-tenant's memory counts), and the best trial's learning rate and eval loss (packed and unpacked runs of
one config compute the same thing, so the best config should agree).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ray import tune

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (the random-init checkpoints and data of the throughput benchmark)


class MemorySampler:
    """Peak memory used on GPU 0, as nvidia-smi reports it (all processes), sampled in a thread."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._interval = interval_s
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                self.peak_mib = max(self.peak_mib, float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass  # no GPU (a CPU dry run): no figure
            self._stop.wait(self._interval)


def sweep_for(mode: str, args, ckpt: Path, data: Path, storage: Path):
    from raylora import Resources, Sweep
    from raylora.config import AdapterConfig, DataConfig, FinetuneConfig, ModelConfig, TrainingConfig

    base = FinetuneConfig(
        model=ModelConfig(name_or_path=str(ckpt), dtype="bfloat16", attn_implementation="sdpa"),
        data=DataConfig(path=str(data), format="text", max_length=args.seq, eval_fraction=0.05),
        adapter=AdapterConfig(r=16, alpha=32.0, dropout=0.05, target_modules="all-linear", qlora=args.qlora),
        training=TrainingConfig(
            learning_rate=2e-4,
            max_steps=args.steps,
            batch_size=args.batch,
            warmup_steps=min(10, args.steps - 1),
            eval_every=args.eval_every or args.steps,
            eval_batches=2,
            log_every=10,
            seed=0,
        ),
    )
    lrs = [round(1e-4 + i * (2e-4 / max(1, args.trials - 1)), 8) for i in range(args.trials)]
    gpu = 1.0 if mode != "fraction" else 1.0 / args.concurrency
    cpus = 1.0
    if args.cpu:  # a dry run of the script on the CPU: the same modes, CPUs in place of the GPU
        gpu, cpus = 0.0, (1.0 / args.concurrency if mode == "fraction" else 1.0)
    return Sweep(
        name=f"sweep-throughput-{mode}",
        base=base,
        search_space={"training.learning_rate": tune.grid_search(lrs)},
        search_alg="grid",
        scheduler=args.scheduler,
        grace_period=args.eval_every or args.steps,
        num_samples=1,
        resources=Resources(workers=1, cpus_per_worker=cpus, gpus_per_worker=gpu),
        storage_path=str(storage / mode),
        pack=args.pack if mode == "packed" else False,
        max_concurrent_trials=args.concurrency if mode == "fraction" else None,
    )


class Collect(tune.Callback):
    """Every trial's last result, and its train-window rates, from the driver."""

    def __init__(self) -> None:
        self.last: dict[str, dict] = {}
        self.rates: dict[str, list[float]] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last[trial.trial_id] = result
        for record in result.get("train_history", []):
            self.rates.setdefault(trial.trial_id, []).append(record["tokens_per_sec"])


def run_mode(mode: str, args, ckpt: Path, data: Path, storage: Path) -> dict:
    from raylora.sweep import run_sweep

    sweep = sweep_for(mode, args, ckpt, data, storage)
    collect = Collect()
    started = time.perf_counter()
    with MemorySampler() as memory:
        result = run_sweep(sweep, callbacks=[collect], verbose=0)
    wall = time.perf_counter() - started
    tokens = sum(r.get("tokens_seen", 0.0) for r in collect.last.values())
    # A trial's steady rate: its train windows after the first (which holds the compile and warm-up).
    steady = [statistics.median(r[1:]) for r in collect.rates.values() if len(r) > 1]
    setup = [r.get("setup_time_s", float("nan")) for r in collect.last.values()]
    errors = [t.error for t in result.trials if t.error]
    best = result.best
    return {
        "mode": mode,
        "trials": len(result.trials),
        "errors": errors,
        "wall_s": wall,
        "tokens": tokens,
        "sweep_tokens_per_s": tokens / wall,
        "trial_steady_tokens_per_s": statistics.median(steady) if steady else float("nan"),
        "setup_s_median": statistics.median(setup) if setup else float("nan"),
        "setup_s": setup,
        "peak_gib": memory.peak_mib / 1024,
        "engines": sorted({t.engine for t in result.trials if t.engine}),
        "stopped_early": sum(1 for t in result.trials if (t.step or 0) < args.steps),
        "best_lr": best.config["training.learning_rate"] if best else None,
        "best_eval_loss": best.metric if best else None,
        "table": result.table(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1b", choices=sorted(tp.SHAPES))
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--qlora", action="store_true")
    p.add_argument("--modes", default="gpu,fraction,packed")
    p.add_argument("--scheduler", default="fifo", choices=["fifo", "asha"], help="asha: early stopping")
    p.add_argument(
        "--eval-every", type=int, default=0, help="eval (and ASHA's rungs) every N steps; 0: at the end"
    )
    p.add_argument("--concurrency", type=int, default=4, help="trials sharing the GPU in `fraction` mode")
    p.add_argument("--pack", type=int, default=8, help="adapters per engine at most in `packed` mode")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "raylora-sweep-bench"))
    p.add_argument("--json", help="append one JSON line per mode here")
    p.add_argument("--cpu", action="store_true", help="a dry run of the script on a 2-CPU machine")
    args = p.parse_args()

    import ray

    tp.SEQ = args.seq
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    ckpt = tp.build_checkpoint(args.shape, root)
    # One data file per sequence length: the throughput benchmark's file is written once per directory.
    (root / f"seq{args.seq}").mkdir(exist_ok=True)
    data = tp.write_data(root / f"seq{args.seq}", records=max(256, args.trials * args.batch * 8))
    ray.init(num_cpus=2 if args.cpu else None, include_dashboard=False, log_to_driver=False)
    # Each run starts its sweeps afresh: raylora refuses to mix a new run into an earlier run's directory.
    shutil.rmtree(root / "storage", ignore_errors=True)
    rows = []
    for mode in args.modes.split(","):
        tp.log(f"== {mode}")
        row = run_mode(mode, args, ckpt, data, root / "storage")
        row.update(
            shape=args.shape,
            batch=args.batch,
            seq=args.seq,
            steps=args.steps,
            qlora=args.qlora,
            scheduler=args.scheduler,
        )
        tp.log(row.pop("table"))
        rows.append(row)
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(json.dumps(row) + "\n")
    steady = next((r["trial_steady_tokens_per_s"] for r in rows if r["mode"] == "gpu"), float("nan"))
    tp.log(
        "\n| mode | trials | wall s | sweep tokens/s | one trial steady tokens/s | sweep / steady | setup s | "
        "peak GiB | best lr | best eval loss |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for r in rows:
        tp.log(
            f"| {r['mode']} | {r['trials']} | {r['wall_s']:.1f} | {r['sweep_tokens_per_s']:.0f} | "
            f"{r['trial_steady_tokens_per_s']:.0f} | {r['sweep_tokens_per_s'] / steady:.2f} | "
            f"{r['setup_s_median']:.1f} | {r['peak_gib']:.1f} | {r['best_lr']} | {r['best_eval_loss']:.4f} |"
            + (f" errors: {r['errors'][:1]}" if r["errors"] else "")
        )


if __name__ == "__main__":
    main()
