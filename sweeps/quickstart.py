# raylora run sweeps/quickstart.py
"""Quickstart: 4 trials over rank x learning rate x target modules under ASHA, on any CPU, offline.

The base is the built-in `tiny-llama` preset (a random-init 2-layer Llama with a byte-level tokenizer) and
the data is the packaged demo set, so this runs anywhere in a few minutes. A random base needs a larger
learning rate than the 1e-4..3e-4 that real checkpoints use (see sweeps/llama3_8b_lora.py).
"""

from ray import tune

from raylora import Resources, Sweep, demo_config

base = demo_config()
base.training.max_steps = 60
base.training.eval_every = 10
base.training.output_dir = "outputs/quickstart"

sweep = Sweep(
    name="quickstart",
    base=base,
    search_space={
        "adapter.r": tune.choice([4, 16]),
        "training.learning_rate": tune.loguniform(1e-3, 5e-3),
        "adapter.target_modules": tune.choice(["attention", "all-linear"]),
        "adapter.alpha_ratio": 2.0,
    },
    metric="eval_loss",
    mode="min",
    search_alg="random",
    scheduler="asha",
    grace_period=20,
    num_samples=4,
    resources=Resources(workers=1, cpus_per_worker=1),
    storage_path="raylora_results",
)
