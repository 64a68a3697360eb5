# raylora run sweeps/fsdp_2worker.py --address auto
"""LoRA trials sharded with FSDP2 over 2 GPU workers each (Ray Train TorchTrainer inside each trial).

For bases that do not fit one GPU with their activations, or to finish each trial sooner. Workers may land
on different nodes (placement_strategy SPREAD); then `storage_path` must be shared (s3://, gs:// or NFS).
Set RAYLORA_MODEL / RAYLORA_DATA / RAYLORA_STORAGE as in llama3_8b_lora.py.
"""

import os

from ray import tune

from raylora import AdapterConfig, DataConfig, FinetuneConfig, ModelConfig, Resources, Sweep, TrainingConfig

base = FinetuneConfig(
    model=ModelConfig(name_or_path=os.environ.get("RAYLORA_MODEL", "meta-llama/Meta-Llama-3-8B")),
    data=DataConfig(
        path=os.environ.get("RAYLORA_DATA", "yahma/alpaca-cleaned"),
        format="instruction",
        max_length=2048,
        packing=True,
    ),
    adapter=AdapterConfig(r=16, alpha=32.0, target_modules="all-linear"),
    training=TrainingConfig(
        learning_rate=2e-4,
        max_steps=1000,
        batch_size=4,
        grad_accum_steps=2,
        warmup_steps=50,
        eval_every=100,
        eval_batches=50,
    ),
)

sweep = Sweep(
    name="llama3-8b-fsdp",
    base=base,
    search_space={
        "adapter.r": tune.grid_search([16, 64]),
        "training.learning_rate": tune.grid_search([1e-4, 2e-4]),
    },
    search_alg="grid",
    scheduler="asha",
    grace_period=200,
    num_samples=1,
    resources=Resources(workers=2, cpus_per_worker=8, gpus_per_worker=1, placement_strategy="PACK"),
    storage_path=os.environ.get("RAYLORA_STORAGE", "s3://my-bucket/raylora"),
)
