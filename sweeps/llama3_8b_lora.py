# raylora run sweeps/llama3_8b_lora.py --address auto
"""LoRA on a Llama-3-8B-class base: rank x learning rate x target modules, ASHA, one GPU per trial.

Set RAYLORA_MODEL to another hub id or a local checkpoint directory, and RAYLORA_DATA to your data
(a .jsonl/.json/.csv/.parquet file or a hub dataset id, alpaca-style instruction/input/output fields).
"""

import os

from ray import tune

from raylora import AdapterConfig, DataConfig, FinetuneConfig, ModelConfig, Resources, Sweep, TrainingConfig

base = FinetuneConfig(
    model=ModelConfig(
        name_or_path=os.environ.get("RAYLORA_MODEL", "meta-llama/Meta-Llama-3-8B"), dtype="bfloat16"
    ),
    data=DataConfig(
        path=os.environ.get("RAYLORA_DATA", "yahma/alpaca-cleaned"),
        format="instruction",
        max_length=2048,
        packing=True,
    ),
    adapter=AdapterConfig(r=16, alpha=32.0, dropout=0.05),
    training=TrainingConfig(
        learning_rate=2e-4,
        max_steps=1000,
        batch_size=4,
        grad_accum_steps=4,
        warmup_steps=50,
        eval_every=100,
        log_every=10,
        eval_batches=50,
        # The frozen base's matmuls in FP8: ~1.25x the tokens/s on H100/H200-class GPUs (BENCHMARKS.md).
        # Those GPUs only: set False on an A100 or older, where the trial would stop with that advice.
        fp8=True,
    ),
)

sweep = Sweep(
    name="llama3-8b-lora",
    base=base,
    search_space={
        "adapter.r": tune.choice([8, 16, 32, 64]),
        "adapter.alpha_ratio": tune.choice([1.0, 2.0]),
        "training.learning_rate": tune.loguniform(1e-4, 3e-4),
        "adapter.target_modules": tune.choice(["attention", "all-linear"]),
    },
    search_alg="optuna",
    scheduler="asha",
    grace_period=200,
    num_samples=16,
    resources=Resources(workers=1, cpus_per_worker=8, gpus_per_worker=1),
    storage_path=os.environ.get("RAYLORA_STORAGE", "s3://my-bucket/raylora"),
)
