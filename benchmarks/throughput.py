# PYTHONUNBUFFERED=1 python benchmarks/throughput.py --shapes 1b --modes lora,qlora --json out.jsonl
"""GPU throughput and memory: raylora's loop against the HF `Trainer` + PEFT anchor, side by side (issue 6).

One process, one GPU. For each row (shape x targets x mode) it trains, on the same random-init Llama
checkpoint and the same number of tokens per step:

- `anchor`: HF `transformers.Trainer` + PEFT as ../shared/DESIGN.md measured it: LoRA r=16 (alpha 32, dropout
  0.05), bf16 weights and `bf16=True`, SDPA, seq 2048, batch 8 (1B) or 4 (8B), labels = input ids. For QLoRA
  rows the anchor is the textbook recipe: NF4 + double quantisation, `prepare_model_for_kbit_training` (its
  default: fp32 upcast of the unquantised modules and gradient checkpointing).
- `raylora`: `raylora.training.train` as it is (defaults: compiled decoder layers on a GPU, the lean LoRA
  branch, the chunked head + cross-entropy; activation checkpointing under QLoRA only).
- `raylora-eager`: the same with `training.compile="off"`, to show what compilation adds.
- `raylora-v0`: (not run by default) the loss on the model's full logits (`raylora.loss.chunkable_head` patched to return
  None), compile off.
- `raylora-fp8`: the defaults plus `training.fp8=True` (the frozen base's linear layers in FP8); bf16 LoRA
  rows only (FP8 and QLoRA exclude each other).
- `raylora-ckpt-all`, `raylora-ckpt-F` (F a fraction, e.g. `raylora-ckpt-0.75`): the defaults with
  `training.activation_checkpointing` set to True (every layer) or F, to show what checkpointing costs and
  saves against the QLoRA default.

Each raylora row records how many graphs dynamo compiled (`dynamo_graphs`): 0 in a compiled row would mean
the compiled path was never entered.

raylora loads the checkpoint through its normal path (`model.name_or_path` = the local directory) and reads a
local `text`-format jsonl of random letters, one record per row, truncated to exactly 2048 tokens by the
byte-level tokenizer: no padding, no packing mask, the same plain causal attention as the anchor.

Timing: `--warmup` optimizer steps are run and dropped, then `--steps` steps are timed (host clock, after a
device sync at the end of each step: the anchor's callback synchronises; raylora's loop reads the loss on the
host every step). Peak memory: `torch.cuda.max_memory_allocated` over training, minus what was allocated
before the run started (so nothing a previous run left behind is counted), weights and optimizer included.

MFU: FLOPs per token = 4 x frozen matmul params (forward 2N, backward input gradients 2N; no weight
gradients) + 6 x trainable params + attention 6 x n_layers x seq x d_model (causal QK^T and PV, forward +
backward), over 989e12 FLOP/s (H200 dense bf16, datasheet). Frozen matmul params count the output head (tied
or not) and not the input embedding lookup. QLoRA rows count the same FLOPs (dequantisation is overhead).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import shutil
import string
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

SEQ = 2048
PEAK_FLOPS = 989e12  # H200 SXM dense bf16, datasheet (../.library H200.md: measured matmul ceiling ~790e12)

SHAPES = {
    # Llama-3.2-1B: tied embeddings
    "1b": dict(
        config=dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            tie_word_embeddings=True,
        ),
        batch=8,
    ),
    # Llama-3-8B
    "8b": dict(
        config=dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=False,
        ),
        batch=4,
    ),
}
VOCAB = 128256
# A CPU smoke test of the script itself (`--shapes tiny`): the 1B layout shrunk, same code path.
SHAPES["small"] = dict(  # CPU checks of training dynamics: the 1B vocabulary and layout, narrow
    config=dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    batch=4,
)
SHAPES["tiny"] = dict(
    config=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    ),
    batch=2,
)
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def log(*parts) -> None:
    print(*parts, flush=True)


# ---- checkpoint and data ---------------------------------------------------------------------------------


def build_checkpoint(shape: str, root: Path) -> Path:
    """A random-init bf16 Llama checkpoint of `shape` with raylora's byte-level tokenizer, written once."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from raylora.tiny import materialize_preset

    target = root / f"llama-{shape}"
    if (target / "config.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(materialize_preset("tiny-llama"))
    tokenizer.model_max_length = 131072
    config = LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPES[shape]["config"],
    )
    started = time.perf_counter()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with DEVICE:
            model = LlamaForCausalLM(config)  # init on the GPU: seconds, not minutes
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    n = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    torch.cuda.empty_cache()
    log(f"built {target} ({n / 1e9:.2f}B params) in {time.perf_counter() - started:.0f}s")
    return target


def write_data(root: Path, records: int) -> Path:
    """`text` records of random lowercase letters, each longer than SEQ bytes (one byte = one token)."""
    path = root / "random-text.jsonl"
    if not path.exists():
        rng = random.Random(0)
        with path.open("w") as handle:
            for _ in range(records):
                text = "".join(rng.choices(string.ascii_lowercase + " ", k=SEQ + 64))
                handle.write(json.dumps({"text": text}) + "\n")
    return path


# ---- FLOPs ----------------------------------------------------------------------------------------------


def flops_per_token(shape: str, targets: str) -> tuple[float, int, int]:
    c = SHAPES[shape]["config"]
    d, ff, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    q = c["num_attention_heads"] * c["head_dim"]
    attn = [(d, q), (d, kv), (d, kv), (q, d)]
    mlp = [(d, ff), (d, ff), (ff, d)]
    frozen = layers * sum(i * o for i, o in attn + mlp) + VOCAB * d  # + the head matmul
    linears = attn + (mlp if targets == "all-linear" else [])
    trainable = layers * sum(16 * (i + o) for i, o in linears)
    attention = 6 * layers * SEQ * q
    return 4 * frozen + 6 * trainable + attention, frozen, trainable


# ---- the two sides ---------------------------------------------------------------------------------------


def run_anchor(shape: str, targets: str, mode: str, ckpt: Path, warmup: int, steps: int, work: Path) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    batch = SHAPES[shape]["batch"]
    kwargs = dict(dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": DEVICE})
    if mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(ckpt, **kwargs)
    model.config.use_cache = False
    if mode == "qlora":
        model = prepare_model_for_kbit_training(model)
    torch.manual_seed(0)
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=ATTENTION if targets == "attention" else "all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch * (warmup + steps)):
        ids = torch.randint(0, 256, (SEQ,), generator=generator)
        rows.append({"input_ids": ids, "labels": ids.clone()})

    times: list[float] = []
    losses: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if CUDA:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = TrainingArguments(
        output_dir=str(work / "anchor"),
        per_device_train_batch_size=batch,
        max_steps=warmup + steps,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        bf16=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=0,
        use_cpu=not CUDA,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=default_data_collator,
        callbacks=[StepTimer()],
    )
    trainer.train()
    tokens = batch * SEQ * steps
    result = {
        "tokens": tokens,
        "seconds": times[warmup + steps - 1] - times[warmup - 1],
        "losses": losses,
    }
    del trainer, model
    return result


class _TimingReporter:
    def __init__(self):
        self.times: dict[int, float] = {}
        self.seen: dict[int, float] = {}
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.peak = math.nan

    def report(self, metrics, *, checkpoint_dir=None):
        from raylora.names import EVAL_LOSS, GRAD_NORM, PEAK_MEMORY_GIB, STEP, TOKENS_SEEN, TRAIN_LOSS

        if TRAIN_LOSS in metrics and EVAL_LOSS not in metrics:
            step = int(metrics[STEP])
            self.times[step] = time.perf_counter()
            self.seen[step] = metrics[TOKENS_SEEN]
            self.losses.append(metrics[TRAIN_LOSS])
            self.grad_norms.append(metrics[GRAD_NORM])
            self.peak = metrics[PEAK_MEMORY_GIB]


def run_raylora(
    shape: str,
    targets: str,
    mode: str,
    ckpt: Path,
    data: Path,
    warmup: int,
    steps: int,
    work: Path,
    v0: bool = False,
    compile_mode: str = "auto",
    reporter: _TimingReporter | None = None,
    **training: object,
) -> dict:
    import importlib

    loss = importlib.import_module("raylora.loss")
    from raylora.config import AdapterConfig, DataConfig, FinetuneConfig, ModelConfig, TrainingConfig

    total = warmup + steps
    config = FinetuneConfig(
        model=ModelConfig(name_or_path=str(ckpt), dtype="bfloat16", attn_implementation="sdpa"),
        data=DataConfig(path=str(data), format="text", max_length=SEQ, packing=False, eval_fraction=0.05),
        adapter=AdapterConfig(r=16, alpha=32.0, dropout=0.05, target_modules=targets, qlora=mode == "qlora"),
        training=TrainingConfig(
            learning_rate=2e-4,
            max_steps=total,
            batch_size=SHAPES[shape]["batch"],
            warmup_steps=0,
            lr_schedule="constant",
            eval_every=total,
            eval_batches=1,
            log_every=1,
            checkpoint_every=0,
            precision="bf16",
            output_dir=str(work / "raylora"),
            seed=0,
            compile=compile_mode,
            **training,
        ),
    )
    reporter = reporter or _TimingReporter()
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    from raylora.training import train

    original = loss.chunkable_head
    if v0:
        loss.chunkable_head = lambda model: None  # the full-logits loss of the loop before issue 6
    try:
        train(config, reporter=reporter)
    finally:
        loss.chunkable_head = original
    return {
        "tokens": reporter.seen[total] - reporter.seen[warmup],
        "seconds": reporter.times[total] - reporter.times[warmup],
        "losses": reporter.losses,
        "loop_peak_gib": reporter.peak,
        "dynamo_graphs": counters["stats"]["unique_graphs"] - graphs_before,
    }


# What each raylora impl changes from the loop's defaults (run_raylora's keyword arguments).
RAYLORA_IMPLS: dict[str, dict] = {
    "raylora": {},
    "raylora-eager": dict(compile_mode="off"),
    "raylora-v0": dict(v0=True, compile_mode="off"),
    "raylora-fp8": dict(fp8=True),
    "raylora-ckpt-all": dict(activation_checkpointing=True),
}


def raylora_impl(impl: str) -> dict:
    if impl.startswith("raylora-ckpt-") and impl != "raylora-ckpt-all":
        return dict(activation_checkpointing=float(impl.removeprefix("raylora-ckpt-")))
    return RAYLORA_IMPLS[impl]


def measure(impl: str, shape: str, targets: str, mode: str, ckpt: Path, data: Path, a) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"{impl}-", dir=a.workdir))
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated() if CUDA else 0
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    row = {"impl": impl, "shape": shape, "targets": targets, "mode": mode}
    started = time.perf_counter()
    try:
        if impl == "anchor":
            out = run_anchor(shape, targets, mode, ckpt, a.warmup, a.steps, work)
        else:
            out = run_raylora(shape, targets, mode, ckpt, data, a.warmup, a.steps, work, **raylora_impl(impl))
        flops, frozen, trainable = flops_per_token(shape, targets)
        tps = out["tokens"] / out["seconds"]
        row.update(
            out,
            tokens_per_s=tps,
            mfu=tps * flops / PEAK_FLOPS,
            peak_gib=(torch.cuda.max_memory_allocated() - before) / 2**30 if CUDA else math.nan,
            flops_per_token=flops,
            trainable_params=trainable,
        )
    except Exception as error:  # an OOM in one row must not lose the others
        traceback.print_exc()
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    row["wall_s"] = time.perf_counter() - started
    gc.collect()
    torch.cuda.empty_cache()
    shutil.rmtree(work, ignore_errors=True)
    row["left_allocated_gib"] = (torch.cuda.memory_allocated() - before) / 2**30 if CUDA else 0.0
    return row


def table(rows: list[dict]) -> str:
    anchors = {(r["shape"], r["targets"], r["mode"]): r for r in rows if r["impl"] == "anchor"}
    bf16 = {(r["shape"], r["targets"], r["impl"]): r for r in rows if r["mode"] == "lora"}
    head = (
        f"{'shape':5} {'targets':10} {'mode':5} {'impl':16} {'tok/s':>8} {'MFU':>6} {'peak GiB':>8} "
        f"{'x anchor tok/s':>14} {'x anchor mem':>12} {'x bf16 tok/s':>12} {'x bf16 mem':>10} "
        f"{'loss first->last':>17}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        key = f"{r['shape']:5} {r['targets']:10} {r['mode']:5} {r['impl']:16}"
        if "error" in r:
            lines.append(f"{key} {r['error']}")
            continue
        a = anchors.get((r["shape"], r["targets"], r["mode"]))
        b = bf16.get((r["shape"], r["targets"], r["impl"])) if r["mode"] == "qlora" else None

        def ratio(x, ref, k):
            return f"{x[k] / ref[k]:.2f}x" if ref and "error" not in ref else "-"

        losses = r.get("losses") or [math.nan]
        lines.append(
            f"{key} {r['tokens_per_s']:8.0f} {100 * r['mfu']:5.1f}% {r['peak_gib']:8.1f} "
            f"{ratio(r, a, 'tokens_per_s'):>14} {ratio(r, a, 'peak_gib'):>12} "
            f"{ratio(r, b, 'tokens_per_s'):>12} {ratio(r, b, 'peak_gib'):>10} "
            f"{losses[0]:8.3f}->{losses[-1]:.3f}"
        )
    return "\n".join(lines)


def main() -> None:
    global SEQ
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1b", help="comma list of 1b, 8b")
    p.add_argument("--targets", default="attention,all-linear")
    p.add_argument("--modes", default="lora,qlora")
    p.add_argument("--impls", default="anchor,raylora-eager,raylora")
    p.add_argument(
        "--seq", type=int, default=SEQ, help="sequence length (2048; smaller only for smoke tests)"
    )
    p.add_argument("--skip", default="", help="comma list of impl/mode pairs not to run, e.g. anchor/qlora")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "raylora-bench"))
    p.add_argument("--json", default=None, help="append one JSON line per measurement here")
    a = p.parse_args()
    SEQ = a.seq
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = Path(a.workdir)
    root.mkdir(parents=True, exist_ok=True)
    import peft
    import transformers

    log(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"python {sys.version.split()[0]}, GPU {torch.cuda.get_device_name() if CUDA else 'none (CPU)'}"
    )
    data = write_data(root, records=256)
    rows: list[dict] = []
    for shape in a.shapes.split(","):
        ckpt = build_checkpoint(shape, root)
        for mode in a.modes.split(","):
            for targets in a.targets.split(","):
                for impl in a.impls.split(","):
                    if f"{impl}/{mode}" in a.skip.split(",") or (impl, mode) == ("raylora-fp8", "qlora"):
                        continue
                    row = measure(impl, shape, targets, mode, ckpt, data, a)
                    rows.append(row)
                    shown = {k: v for k, v in row.items() if k != "losses"}
                    log(f"ROW {json.dumps(shown)}")
                    if a.json:
                        with open(a.json, "a") as handle:
                            handle.write(json.dumps(row) + "\n")
        shutil.rmtree(ckpt, ignore_errors=True)
    log("")
    log(f"seq {SEQ}; warm-up {a.warmup} steps, timed {a.steps}; MFU over {PEAK_FLOPS:.3g} FLOP/s")
    log(table(rows))


if __name__ == "__main__":
    main()
