# python benchmarks/scaling.py --shape 1b --workers 1,2 --steps 30
"""Scaling of one trial over GPU workers: the real sweep path (Tune trial -> TorchTrainer -> FSDP2).

For each worker count N, one sweep of one trial runs through `run_sweep` with `Resources(workers=N,
gpus_per_worker=1)`, at equal global batch (per-worker batch = global / N), on the random-init Llama shape
and random-letter data of benchmarks/throughput.py. Printed per N: tokens/s in all and per GPU (steps after
the warm-up), scaling efficiency (tokens/s per GPU against the fewest GPUs run), peak memory per GPU (the max
over workers), the parameters each GPU holds (its FSDP2 shards: about the base / N) and the train loss at
every step; then the largest loss gap against the fewest GPUs, and the largest base N GPUs could hold at the
measured per-GPU overhead. `--modes lora,qlora` runs the same worker counts again with a 4-bit (QLoRA) base.

`--shape 70b` is a base no single GPU can hold: the Llama-3-70B layer shape (d 8192, MLP 28672, 64 query and
8 key-value heads, vocabulary 128256) with 90 layers (`--layers`), 79.1B parameters, 147 GiB in bf16 against
an H200's 139 GiB. Its checkpoint is written one layer at a time into safetensors files with an index
(`write_streamed_checkpoint`), never whole in memory; it needs about 150 GiB of disk, and the trials load it
straight into each GPU's shards. A worker count whose GPUs cannot hold the base at all is reported, not run.
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

# A base no single GPU holds: the Llama-3-70B layer shape, 90 layers instead of 80 (147 GiB in bf16).
BIG_SHAPES = {
    "70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=90,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    # CPU dry runs of the streamed checkpoint and of sharded loading (`--shape tiny-70b --gpus-per-worker 0`).
    "tiny-70b": dict(
        hidden_size=64,
        intermediate_size=224,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
    ),
}
GIB = 2**30


def shape_config(shape: str, layers: int | None) -> dict:
    config = dict(BIG_SHAPES[shape] if shape in BIG_SHAPES else tp.SHAPES[shape]["config"])
    if layers is not None:
        config["num_hidden_layers"] = layers
    return config


def parameter_count(config: dict, vocab: int) -> int:
    d, ff, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * ff + 2 * d
    embeddings = vocab * d * (1 if config["tie_word_embeddings"] else 2)
    return n * per_layer + embeddings + d


def write_streamed_checkpoint(shape: str, root: Path, layers: int | None) -> Path:
    """A random-init bf16 Llama checkpoint written one layer at a time (safetensors files and an index).

    Each tensor is drawn on the GPU (std 0.02, norms 1, as transformers initialises Llama), copied to the
    host and written with the other tensors of its layer; no more than one layer is in memory at once.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from raylora.tiny import materialize_preset

    config_args = shape_config(shape, layers)
    target = root / f"llama-{shape}-{config_args['num_hidden_layers']}l"
    if (target / "model.safetensors.index.json").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(materialize_preset("tiny-llama"))
    tokenizer.model_max_length = 131072
    config = LlamaConfig(
        vocab_size=tp.VOCAB,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
        **config_args,
    )
    d, ff = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    generator = torch.Generator(device=tp.DEVICE).manual_seed(0)

    def normal(*shape: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=torch.bfloat16, device=tp.DEVICE).normal_(0.0, 0.02, generator=generator)
        return t.cpu()

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    files: list[tuple[str, dict]] = [
        ("embed", {"model.embed_tokens.weight": normal(tp.VOCAB, d)}),
        ("head", {"lm_head.weight": normal(tp.VOCAB, d), "model.norm.weight": ones(d)}),
    ]
    weight_map: dict[str, str] = {}
    total = 0
    count = config.num_hidden_layers + len(files)

    def write(index: int, tensors: dict) -> None:
        nonlocal total
        name = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        save_file(tensors, str(target / name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()

    for index, (_, tensors) in enumerate(files):
        write(index, tensors)
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        tensors = {
            prefix + "self_attn.q_proj.weight": normal(q, d),
            prefix + "self_attn.k_proj.weight": normal(kv, d),
            prefix + "self_attn.v_proj.weight": normal(kv, d),
            prefix + "self_attn.o_proj.weight": normal(d, q),
            prefix + "mlp.gate_proj.weight": normal(ff, d),
            prefix + "mlp.up_proj.weight": normal(ff, d),
            prefix + "mlp.down_proj.weight": normal(d, ff),
            prefix + "input_layernorm.weight": ones(d),
            prefix + "post_attention_layernorm.weight": ones(d),
        }
        write(len(files) + layer, tensors)
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))
    config.save_pretrained(target)
    tokenizer.save_pretrained(target)
    tp.log(
        f"wrote {target} ({total / GIB:.1f} GiB) in {time.perf_counter() - started:.0f}s, one layer at a time"
    )
    return target


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
    activation_checkpointing: float | None = None,
) -> dict:
    from ray import tune

    from raylora import Resources, Sweep
    from raylora.config import AdapterConfig, DataConfig, FinetuneConfig, ModelConfig, TrainingConfig
    from raylora.names import PARAMETER_MEMORY_GIB, PEAK_MEMORY_GIB, TRAIN_HISTORY
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
            activation_checkpointing=activation_checkpointing,
        ),
    )
    sweep = Sweep(
        name=f"scaling-{'qlora' if qlora else 'lora'}-{workers}gpu",
        base=config,
        search_space={"adapter.r": tune.grid_search([16])},
        search_alg="grid",
        scheduler="fifo",
        num_samples=1,
        # On the CPU (a smoke run) a sliver of a core is left to the trial process beside its workers.
        resources=Resources(workers=workers, cpus_per_worker=2 if gpus else 0.95, gpus_per_worker=gpus),
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
        "peak_gib_per_gpu": last.get(PEAK_MEMORY_GIB),
        "parameter_gib_per_gpu": last.get(PARAMETER_MEMORY_GIB),
        "losses": {int(h["step"]): h["train_loss"] for h in history if "train_loss" in h},
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="1b", choices=sorted([*tp.SHAPES, *BIG_SHAPES]))
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    parser.add_argument("--workers", default="1,2", help="comma-separated GPU worker counts")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of tokens/s")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=tp.SEQ, help="tokens per row")
    parser.add_argument("--gpus-per-worker", type=int, default=1, help="0: a CPU (gloo) smoke run")
    parser.add_argument("--modes", default="lora", help="comma list of lora, qlora")
    parser.add_argument(
        "--activation-checkpointing",
        type=float,
        default=None,
        help="fraction of layers to checkpoint (default: the loop's; 1.0 for the big shapes)",
    )
    parser.add_argument("--work", default=None, help="where checkpoints and data go (kept between calls)")
    parser.add_argument(
        "--prepare-only", action="store_true", help="write the checkpoint and data into --work, run nothing"
    )
    parser.add_argument("--out", default=None, help="also write the rows as JSON lines here")
    args = parser.parse_args()

    import ray
    import torch

    tp.SEQ = args.seq
    big = args.shape in BIG_SHAPES
    checkpointing = args.activation_checkpointing
    if checkpointing is None and big:
        checkpointing = 1.0  # a 90-layer base keeps no layer's activations beyond its input
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="raylora-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    config = shape_config(args.shape, args.layers)
    base_gib = parameter_count(config, tp.VOCAB) * 2 / GIB
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else None
    tp.log(
        f"{args.shape}: {config['num_hidden_layers']} layers, {parameter_count(config, tp.VOCAB) / 1e9:.1f}B "
        f"parameters, {base_gib:.1f} GiB in bf16" + (f"; one GPU has {gpu_gib:.0f} GiB" if gpu_gib else "")
    )
    if big or args.layers is not None:
        ckpt = write_streamed_checkpoint(args.shape, work, args.layers)
    else:
        ckpt = tp.build_checkpoint(args.shape, work)
    data = tp.write_data(work, records=args.global_batch * (args.steps + 4) * 2)
    if args.prepare_only:
        tp.log(f"prepared {ckpt} and {data}")
        return
    ray.init(num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False)
    for mode in args.modes.split(","):
        rows = []
        for workers in [int(w) for w in args.workers.split(",")]:
            held = base_gib / (4 if mode == "qlora" else 1) / workers
            if gpu_gib is not None and args.gpus_per_worker and held > gpu_gib:
                tp.log(
                    f"{mode}, {workers} GPU(s): {held:.0f} GiB of base per GPU exceeds its {gpu_gib:.0f} GiB; not run"
                )
                continue
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
                activation_checkpointing=checkpointing,
            )
            rows.append(row)
            tp.log(json.dumps(row))
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(
                        json.dumps({"shape": args.shape, "layers": config["num_hidden_layers"], **row}) + "\n"
                    )
        if rows:
            table(args, mode, rows, base_gib, gpu_gib)


def table(
    args: argparse.Namespace, mode: str, rows: list[dict], base_gib: float, gpu_gib: float | None
) -> None:
    base = rows[0]
    first, last = base["losses"][min(base["losses"])], base["losses"][max(base["losses"])]
    tp.log(
        f"\n{args.shape} {mode}, r=16 all-linear, seq {tp.SEQ}, global batch {args.global_batch}, "
        f"{args.steps} steps; loss at {base['workers']} GPU {first:.3f} -> {last:.3f}"
    )
    tp.log(
        "| GPUs | tokens/s | tokens/s per GPU | scaling efficiency | peak GiB per GPU | parameter GiB per GPU "
        f"| max loss gap vs {base['workers']} GPU |"
    )
    tp.log("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        gap = max(abs(row["losses"][s] - base["losses"][s]) for s in base["losses"] if s in row["losses"])
        tp.log(
            f"| {row['workers']} | {row['tokens_per_sec']:,.0f} | {row['per_gpu']:,.0f} | "
            f"{row['per_gpu'] / base['per_gpu']:.1%} | {row['peak_gib_per_gpu']:.1f} | "
            f"{row['parameter_gib_per_gpu']:.2f} | {gap:.4f} |"
        )
    if gpu_gib is None:
        return
    # What the measured rows say about larger bases: a GPU's memory beyond its parameters went to
    # activations, gathered layers and the optimizer; at that overhead, the rest holds parameter shards.
    stored = 0.5 if mode == "qlora" else 2.0  # bytes per parameter (NF4 packs two per byte)
    for row in rows:
        overhead = row["peak_gib_per_gpu"] - row["parameter_gib_per_gpu"]
        room = gpu_gib - overhead
        billions = room * row["workers"] * GIB / stored / 1e9
        tp.log(
            f"{row['workers']} GPU(s): {row['parameter_gib_per_gpu']:.1f} GiB of parameters per GPU "
            f"({row['parameter_gib_per_gpu'] * row['workers'] / base_gib:.0%} of the {base_gib:.1f} GiB base "
            f"across them) + {overhead:.1f} GiB of the rest; at that overhead {row['workers']} GPUs of "
            f"{gpu_gib:.0f} GiB hold a base of about {billions:.0f}B parameters ({mode})"
        )


if __name__ == "__main__":
    main()
