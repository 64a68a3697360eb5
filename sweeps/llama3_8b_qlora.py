# raylora run sweeps/llama3_8b_qlora.py --address auto
"""QLoRA on a Llama-3-8B-class base: NF4 4-bit base, four trials sharing each GPU (0.25 GPU per trial).

Set RAYLORA_MODEL / RAYLORA_DATA / RAYLORA_STORAGE as in llama3_8b_lora.py.
"""

import os

from ray import tune

from raylora import AdapterConfig, DataConfig, FinetuneConfig, ModelConfig, Resources, Sweep, TrainingConfig

base = FinetuneConfig(
    model=ModelConfig(name_or_path=os.environ.get("RAYLORA_MODEL", "meta-llama/Meta-Llama-3-8B")),
    data=DataConfig(
        path=os.environ.get("RAYLORA_DATA", "yahma/alpaca-cleaned"), format="instruction", max_length=1024
    ),
    adapter=AdapterConfig(r=16, alpha=32.0, dropout=0.05, target_modules="all-linear", qlora=True),
    training=TrainingConfig(
        learning_rate=2e-4,
        max_steps=800,
        batch_size=4,
        grad_accum_steps=4,
        warmup_steps=40,
        eval_every=100,
        eval_batches=50,
        activation_checkpointing=True,
    ),
)

sweep = Sweep(
    name="llama3-8b-qlora",
    base=base,
    search_space={
        "adapter.r": tune.choice([16, 32, 64]),
        "adapter.alpha_ratio": 2.0,
        "training.learning_rate": tune.loguniform(1e-4, 3e-4),
        "adapter.use_rslora": tune.choice([False, True]),
    },
    search_alg="random",
    scheduler="asha",
    grace_period=200,
    num_samples=8,
    resources=Resources(workers=1, cpus_per_worker=4, gpus_per_worker=0.25),
    storage_path=os.environ.get("RAYLORA_STORAGE", "s3://my-bucket/raylora"),
)
