# python benchmarks/scaling.py --shape 1b --workers 1,2 --steps 30
"""Scaling of one trial over GPU workers: the real sweep path (Tune trial -> TorchTrainer -> FSDP2).

For each worker count N, one sweep of one trial runs through `run_sweep` with `Resources(workers=N,
gpus_per_worker=1)`, at equal global batch (per-worker batch = global / N), on the random-init Llama shape
and random-letter data of benchmarks/throughput.py. Printed per N: tokens/s in all and per GPU (steps after
the warm-up), scaling efficiency (tokens/s per GPU against 1 GPU), peak memory per GPU (the max over
workers) and the train loss at every step; then the largest loss gap against N=1. `--modes lora,qlora` runs
the same worker counts again with a 4-bit (QLoRA) base.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# NVLink multicast stays off in every process this starts (Ray workers inherit the environment).
for name, value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ.setdefault(name, value)

import throughput as tp  # noqa: E402  (the shapes, checkpoint and data of the throughput benchmark)


def run(
    workers: int,
    ckpt: Path,
    data: Path,
    global_batch: int,
    steps: int,
    warmup: int,
    work: Path,
    gpus: int,
    qlora: bool = False,
) -> dict:
    from ray import tune

    from raylora import Resources, Sweep
    from raylora.config import AdapterConfig, DataConfig, FinetuneConfig, ModelConfig, TrainingConfig
    from raylora.names import TRAIN_HISTORY
    from raylora.sweep import run_sweep

    config = FinetuneConfig(
        model=ModelConfig(name_or_path=str(ckpt), dtype="bfloat16", attn_implementation="sdpa"),
        data=DataConfig(path=str(data), format="text", max_length=tp.SEQ, packing=False, eval_fraction=0.05),
        adapter=AdapterConfig(r=16, alpha=32.0, dropout=0.0, target_modules="all-linear", qlora=qlora),
        training=TrainingConfig(
            learning_rate=2e-4,
            max_steps=steps,
            batch_size=global_batch // workers,
            warmup_steps=0,
            lr_schedule="constant",
            eval_every=steps,
            eval_batches=1,
            log_every=1,
            precision="bf16",
            seed=0,
        ),
    )
    sweep = Sweep(
        name=f"scaling-{'qlora' if qlora else 'lora'}-{workers}gpu",
        base=config,
        search_space={"adapter.r": tune.grid_search([16])},
        search_alg="grid",
        scheduler="fifo",
        num_samples=1,
        resources=Resources(workers=workers, cpus_per_worker=2 if gpus else 1, gpus_per_worker=gpus),
        storage_path=str(work / "results"),
        max_failures=0,
    )
    started = time.perf_counter()
    result = run_sweep(sweep, verbose=0)
    trial = result.trials[0]
    if trial.status == "ERROR":
        raise RuntimeError(f"{workers}-GPU trial failed: {trial.error}")
    lines = (
        (Path(result.experiment_path) / f"trial_{trial.trial_id}" / "result.json").read_text().splitlines()
    )
    last = json.loads(lines[-1])
    history = [*last[TRAIN_HISTORY], last]
    timed = [h for h in history if h["step"] > warmup and "tokens_per_sec" in h]
    tokens_per_sec = sum(h["tokens_per_sec"] for h in timed) / len(timed)
    return {
        "mode": "qlora" if qlora else "lora",
        "workers": workers,
        "tokens_per_sec": tokens_per_sec,
        "per_gpu": tokens_per_sec / workers,
        "peak_gib_per_gpu": last.get("peak_memory_gib"),
        "losses": {int(h["step"]): h["train_loss"] for h in history if "train_loss" in h},
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="1b", choices=sorted(tp.SHAPES))
    parser.add_argument("--workers", default="1,2", help="comma-separated GPU worker counts")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of tokens/s")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--gpus-per-worker", type=int, default=1, help="0: a CPU (gloo) smoke run")
    parser.add_argument("--modes", default="lora", help="comma list of lora, qlora")
    parser.add_argument("--out", default=None, help="also write the rows as JSON lines here")
    args = parser.parse_args()

    import ray
    import torch

    work = Path(tempfile.mkdtemp(prefix="raylora-scaling-"))
    ckpt = tp.build_checkpoint(args.shape, work)
    data = tp.write_data(work, records=args.global_batch * (args.steps + 4) * 2)
    ray.init(num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False)
    for mode in args.modes.split(","):
        rows = []
        for workers in [int(w) for w in args.workers.split(",")]:
            row = run(
                workers,
                ckpt,
                data,
                args.global_batch,
                args.steps,
                args.warmup,
                work,
                args.gpus_per_worker,
                qlora=mode == "qlora",
            )
            rows.append(row)
            tp.log(json.dumps(row))
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(json.dumps({"shape": args.shape, **row}) + "\n")
        table(args, mode, rows)


def table(args: argparse.Namespace, mode: str, rows: list[dict]) -> None:
    base = rows[0]
    first, last = base["losses"][min(base["losses"])], base["losses"][max(base["losses"])]
    tp.log(
        f"\n{args.shape} {mode}, r=16 all-linear, seq {tp.SEQ}, global batch {args.global_batch}, "
        f"{args.steps} steps; loss at {base['workers']} GPU {first:.3f} -> {last:.3f}"
    )
    tp.log(
        "| GPUs | tokens/s | tokens/s per GPU | scaling efficiency | peak GiB per GPU | max loss gap vs 1 GPU |"
    )
    tp.log("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        gap = max(abs(row["losses"][s] - base["losses"][s]) for s in base["losses"] if s in row["losses"])
        tp.log(
            f"| {row['workers']} | {row['tokens_per_sec']:,.0f} | {row['per_gpu']:,.0f} | "
            f"{row['per_gpu'] / base['per_gpu']:.1%} | {row['peak_gib_per_gpu']:.1f} | {gap:.4f} |"
        )


if __name__ == "__main__":
    main()
