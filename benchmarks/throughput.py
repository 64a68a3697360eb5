# PYTHONUNBUFFERED=1 python benchmarks/throughput.py --shapes 1b --modes lora,qlora --json out.jsonl
"""GPU throughput, memory and first-step latency: raylora's loop against the strongest single-GPU anchors.

One GPU. For each row (shape x targets x mode x impl) it trains, on the same random-init Llama checkpoint
and the same number of tokens per step (LoRA r=16, alpha 32, dropout 0.05; bf16; seq 2048; batch 8 on 1B,
4 on 8B):

Anchors (issues 6 and 18):
- `anchor`: HF `transformers.Trainer` + PEFT as ../shared/DESIGN.md measured it: bf16 weights and
  `bf16=True`, SDPA, labels = input ids. For QLoRA rows the textbook recipe: NF4 + double quantisation,
  `prepare_model_for_kbit_training` (fp32 upcast of the unquantised modules, gradient checkpointing).
- `anchor-liger`: the same with `TrainingArguments(use_liger_kernel=True)` (liger-kernel: fused RMSNorm,
  RoPE, SwiGLU and linear cross-entropy).
- `anchor-unsloth`: Unsloth's `FastLanguageModel` (`from_pretrained` on the same checkpoint, bf16 or, on
  QLoRA rows, its 4-bit load; `get_peft_model` with the same LoRA) trained by the same `Trainer` settings,
  with Unsloth's default `use_gradient_checkpointing="unsloth"` (activations offloaded to host memory).
- `anchor-unsloth-nockpt`: the same without gradient checkpointing (faster, more memory).
raylora (`raylora.training.train`, the loop's defaults unless the name says otherwise):
- `raylora`: defaults (compiled decoder layers on a GPU, the lean LoRA branch, the head loss by Liger's fused
  linear cross-entropy where liger-kernel is installed, else the compiled chunked loss; activation
  checkpointing under QLoRA only).
- `raylora-warm`: the defaults again, with the on-disk compile caches (inductor's, Triton's) that the
  `raylora` row of the same shape, targets and mode left: what a later trial on the same node pays (the
  in-memory caches are those of the rows run in between, which start cold). Every other compiled raylora
  row starts from empty caches, on disk and in memory: a fresh node's first trial.
- `raylora-eager`: `training.compile="off"`; `raylora-v0`: (not run by default) the loss on the model's full
  logits (`raylora.loss.chunkable_head` patched to return None), compile off.
- `raylora-fp8`: `training.fp8=True` (raylora's `Float8Linear`); bf16 LoRA rows only.
- `raylora-ckpt-all`, `raylora-ckpt-F` (F a fraction): `training.activation_checkpointing` True or F.
Library kernels in place of raylora's hand-written pieces (benchmarks/kernel_swaps.py says what each replaces):
- `raylora-liger-ce`, `raylora-chunked-ce`: `training.head_loss` "liger" (Liger's fused linear
  cross-entropy) and "chunked" (raylora's own, compiled with the layers): the library against the piece it
  replaced by default.
- `raylora-ao-fp8`: `training.fp8` through torchao's float8 training instead of raylora's `Float8Linear`.
- `raylora-liger-ops`: Liger's RMSNorm, RoPE and SwiGLU on the base model, with raylora's compiled layers.
- `raylora-liger-eager`: Liger's RMSNorm, RoPE, SwiGLU and linear cross-entropy, compile off: Liger's kernels
  instead of the compiler.

Order and processes: `--impls` is cut into segments of consecutive impls that run in the same process, and
the segments run in the order listed; within a segment, rows run impl by impl as listed, then mode, then
targets. So under `--deadline-s` the impls listed first are the last to be left out. Liger's model patches and Unsloth's
import change transformers for the whole process, so a segment of `anchor-liger`, `raylora-liger-ops` and
`raylora-liger-eager` rows runs in a child process of its own, and so does a segment of Unsloth rows; every
other row runs in this process. A child that dies (a CUDA fault, say)
records the row it was on with its exit code and last output, and a new child takes the remaining rows. If a
library cannot be imported, each of its rows records the exact error and the rest are measured. Without a
GPU (dry runs) the children still import their library and then record their rows as not run.

Timing: `--warmup` optimizer steps are run and dropped, then `--steps` steps are timed (host clock, after a
device sync at the end of each step). First-step latency: from the start of the row (before the model is
loaded) to the end of its first optimizer step: model load, adapter set-up, compilation (raylora's
compiled layers; Liger's and Unsloth's Triton kernels) and one step. The children's library import
(`import_s`) comes on top once per process. `cache` says whether the row found compile caches empty
(`cold`), left by an earlier row of the same child process (`in-proc`), or on purpose (`warm`: the
`raylora-warm` rows).

Peak memory: `torch.cuda.max_memory_allocated` over training, minus what was allocated before the row
started, weights and optimizer included. MFU: FLOPs per token = 4 x frozen matmul params (forward 2N,
backward input gradients 2N; no weight gradients) + 6 x trainable params + attention 6 x n_layers x seq x
d_model (causal QK^T and PV, forward + backward), over 989e12 FLOP/s (H200 dense bf16, datasheet). Frozen
matmul params count the output head and not the input embedding lookup. QLoRA and FP8 rows count the same
FLOPs (bf16-equivalent).

After the rows it prints the table, the issue's goals against the fastest anchor that ran, what compiling
costs and saves (first-step latency against steady step time: the break-even step count and a 200-step
trial's total time, compiled and eager), the library-against-hand-written pairs, and, for the rows named in
`--profile`, where their GPU time went (benchmarks/step_profile.py).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import math
import os
import random
import shutil
import string
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

# The checkout's raylora, whatever PYTHONPATH says (the GPU machine's wheel line sets it to the wheels only).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_swaps  # noqa: E402
import step_profile  # noqa: E402

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
# CPU dry runs of the script itself (`--shapes tiny --seq 64`): the 1B layout shrunk, same code path.
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
ALL_LINEAR = ATTENTION + ["gate_proj", "up_proj", "down_proj"]
MODES = ("lora", "qlora")
TARGETS = ("attention", "all-linear")
# The goals (issue 18), checked against the fastest anchor of each row that ran.
GOAL_SPEED, GOAL_MEMORY, GOAL_FP8_SPEED, GOAL_QLORA_SPEED = 1.3, 0.9, 1.6, 1.3


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
    if CUDA:
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


def flops_parts(shape: str, targets: str) -> dict[str, float]:
    """Per token: all model FLOPs, the attention products' share, and the decoder's frozen matmuls (what
    `training.fp8` runs in FP8; the head stays bf16)."""
    c = SHAPES[shape]["config"]
    total, frozen, _ = flops_per_token(shape, targets)
    q = c["num_attention_heads"] * c["head_dim"]
    return {
        "total": total,
        "attention": 6 * c["num_hidden_layers"] * SEQ * q,
        "frozen_decoder": 4 * (frozen - VOCAB * c["hidden_size"]),
    }


# ---- what each impl is ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Impl:
    """One `--impls` name: which loop (`hf`, `unsloth`, `raylora`), which process family runs it (`main`:
    this process; `liger`, `unsloth`: a child of their own), and the loop's options."""

    name: str
    loop: str
    family: str
    options: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def is_anchor(self) -> bool:
        return self.loop != "raylora"

    @property
    def fp8(self) -> bool:
        return bool(self.options.get("fp8"))

    @property
    def needs_gpu(self) -> str | None:
        """Why the row cannot run without a GPU (None: it can)."""
        if self.family == "unsloth":
            return "Unsloth needs a GPU"
        if self.family == "liger" or self.options.get("head_loss") == "liger":
            return "Liger's kernels are Triton GPU kernels"
        return None


RAYLORA_IMPLS: dict[str, dict] = {
    "raylora": {},
    "raylora-warm": dict(warm_cache=True),
    "raylora-eager": dict(compile_mode="off"),
    "raylora-v0": dict(v0=True, compile_mode="off"),
    "raylora-fp8": dict(fp8=True),
    "raylora-ckpt-all": dict(activation_checkpointing=True),
    "raylora-liger-ce": dict(head_loss="liger"),
    "raylora-chunked-ce": dict(head_loss="chunked"),
    "raylora-ao-fp8": dict(fp8=True, ao_fp8=True),
    "raylora-liger-ops": dict(liger_ops=True),
    "raylora-liger-eager": dict(liger_ops=True, head_loss="liger", compile_mode="off"),
}
ANCHOR_IMPLS: dict[str, Impl] = {
    "anchor": Impl("anchor", "hf", "main"),
    "anchor-liger": Impl("anchor-liger", "hf", "liger", {"liger": True}),
    "anchor-unsloth": Impl("anchor-unsloth", "unsloth", "unsloth", {"checkpointing": "unsloth"}),
    "anchor-unsloth-nockpt": Impl("anchor-unsloth-nockpt", "unsloth", "unsloth", {"checkpointing": False}),
}
KNOWN_IMPLS = [*ANCHOR_IMPLS, *RAYLORA_IMPLS, "raylora-ckpt-F (F in [0, 1])"]


def parse_impl(name: str) -> Impl:
    """The `Impl` of an `--impls` name; ValueError naming the valid ones for anything else."""
    if name in ANCHOR_IMPLS:
        return ANCHOR_IMPLS[name]
    if name in RAYLORA_IMPLS:
        options = RAYLORA_IMPLS[name]
    elif name.startswith("raylora-ckpt-"):
        try:
            fraction = float(name.removeprefix("raylora-ckpt-"))
        except ValueError:
            fraction = math.nan
        if not 0 <= fraction <= 1:
            raise ValueError(f"{name!r}: the checkpointed fraction must be a number in [0, 1]")
        options = dict(activation_checkpointing=fraction)
    else:
        raise ValueError(f"unknown impl {name!r}; known: {', '.join(KNOWN_IMPLS)}")
    return Impl(name, "raylora", "liger" if options.get("liger_ops") else "main", dict(options))


@dataclass(frozen=True)
class Row:
    shape: str
    mode: str
    targets: str
    impl: str

    def key(self) -> tuple[str, str, str]:
        return (self.shape, self.targets, self.mode)


def plan_rows(
    shape: str, modes: list[str], targets: list[str], impls: list[str], skip: list[str]
) -> list[Row]:
    """The rows of one shape in run order (modes, then targets, then impls as listed), without the skipped
    ones and without FP8 on QLoRA (the two exclude each other)."""
    rows = []
    for mode in modes:
        for target in targets:
            for impl in impls:
                if parse_impl(impl).fp8 and mode == "qlora":
                    continue
                if any(_skips(entry, impl, mode, target) for entry in skip):
                    continue
                rows.append(Row(shape, mode, target, impl))
    return rows


def segments(impls: list[str]) -> list[tuple[str, list[str]]]:
    """`--impls` cut into runs of consecutive impls of one process family, in the order listed: the rows of a
    segment run together (a child family's segment in one child process), segment after segment, so the
    order of `--impls` is the order of priority under `--deadline-s`."""
    out: list[tuple[str, list[str]]] = []
    for name in impls:
        family = parse_impl(name).family
        if out and out[-1][0] == family:
            out[-1][1].append(name)
        else:
            out.append((family, [name]))
    return out


def _skips(entry: str, impl: str, mode: str, target: str) -> bool:
    name, *parts = entry.split("/")
    return name == impl and all(part in (mode, target) for part in parts)


def check_skip(entry: str) -> None:
    name, *parts = entry.split("/")
    parse_impl(name)
    for part in parts:
        if part not in MODES + TARGETS:
            raise ValueError(f"--skip {entry!r}: {part!r} is neither a mode {MODES} nor targets {TARGETS}")
    if not parts:
        raise ValueError(f"--skip {entry!r}: name the mode or targets to skip, e.g. {name}/qlora")


# ---- timing --------------------------------------------------------------------------------------------------


class _TimingReporter:
    """raylora's `Reporter`: the host time, tokens, loss and grad norm of every train report (log_every=1)."""

    def __init__(self, on_step=None):
        self.times: dict[int, float] = {}
        self.seen: dict[int, float] = {}
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.peak = math.nan
        self.on_step = on_step

    def report(self, metrics, *, checkpoint_dir=None):
        from raylora.names import EVAL_LOSS, GRAD_NORM, PEAK_MEMORY_GIB, STEP, TOKENS_SEEN, TRAIN_LOSS

        if TRAIN_LOSS in metrics and EVAL_LOSS not in metrics:
            step = int(metrics[STEP])
            self.times[step] = time.perf_counter()
            self.seen[step] = metrics[TOKENS_SEEN]
            self.losses.append(metrics[TRAIN_LOSS])
            self.grad_norms.append(metrics[GRAD_NORM])
            self.peak = metrics[PEAK_MEMORY_GIB]
            if self.on_step is not None:
                self.on_step()


_CACHE_DIRS: dict[tuple, str] = {}


@contextlib.contextmanager
def compile_cache(key: tuple, warm: bool, root: Path):
    """Run a row with torch.compile's caches (inductor's on disk, Triton's, the in-memory ones) empty, or,
    `warm`, with those the cold row of the same `key` left behind."""
    from torch._inductor import utils

    if warm:
        if key not in _CACHE_DIRS:
            raise RuntimeError(f"no cold row ran before this warm one ({key}); list `raylora` first")
        directory = _CACHE_DIRS[key]
    else:
        clear = getattr(utils, "clear_caches", None) or getattr(utils, "clear_inductor_caches", None)
        if clear is None:
            raise RuntimeError(
                "this torch has no torch._inductor.utils.clear_caches: cold compiles not ensured"
            )
        clear()
        directory = tempfile.mkdtemp(prefix="compile-cache-", dir=root)
        _CACHE_DIRS[key] = directory
    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
    os.environ["TRITON_CACHE_DIR"] = os.path.join(directory, "triton")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- the loops --------------------------------------------------------------------------------------------


def _train_with_trainer(model, shape: str, total: int, work: Path, hook, *, liger: bool = False) -> dict:
    """Train `model` for `total` steps with HF `Trainer` on random tokens; per-step host times and losses."""
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    batch = SHAPES[shape]["batch"]
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch * total):
        ids = torch.randint(0, 256, (SEQ,), generator=generator)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    times: list[float] = []
    losses: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if CUDA:
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            if hook is not None:
                hook()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = TrainingArguments(
        output_dir=str(work / "trainer"),
        per_device_train_batch_size=batch,
        max_steps=total,
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
        use_liger_kernel=liger,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=default_data_collator,
        callbacks=[StepTimer()],
    )
    trainer.train()
    del trainer
    return {"times": times, "losses": losses}


def run_anchor(
    shape: str,
    targets: str,
    mode: str,
    ckpt: Path,
    warmup: int,
    steps: int,
    work: Path,
    *,
    liger: bool = False,
    hook=None,
    extra_steps: int = 0,
) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

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
    out = _train_with_trainer(model, shape, warmup + steps + extra_steps, work, hook, liger=liger)
    del model
    return _trainer_result(out, shape, warmup, steps)


def run_unsloth(
    shape: str,
    targets: str,
    mode: str,
    ckpt: Path,
    warmup: int,
    steps: int,
    work: Path,
    *,
    checkpointing: str | bool,
    hook=None,
    extra_steps: int = 0,
) -> dict:
    """Unsloth's LoRA (bf16) or QLoRA (its 4-bit load: NF4, double quantisation) on the same checkpoint."""
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(ckpt),
        max_seq_length=SEQ,
        dtype=torch.bfloat16,
        load_in_4bit=mode == "qlora",
        use_gradient_checkpointing=checkpointing,
        random_state=0,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=ATTENTION if targets == "attention" else ALL_LINEAR,
        bias="none",
        use_gradient_checkpointing=checkpointing,
        random_state=0,
    )
    out = _train_with_trainer(model, shape, warmup + steps + extra_steps, work, hook)
    del model
    return _trainer_result(out, shape, warmup, steps)


def _trainer_result(out: dict, shape: str, warmup: int, steps: int) -> dict:
    times = out["times"]
    return {
        "tokens": SHAPES[shape]["batch"] * SEQ * steps,
        "seconds": times[warmup + steps - 1] - times[warmup - 1],
        "losses": out["losses"],
        "first_step_at": times[0],
    }


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
    *,
    ao_fp8: bool = False,
    liger_ops: bool = False,
    warm_cache: bool = False,
    hook=None,
    extra_steps: int = 0,
    **training: object,
) -> dict:
    import importlib

    loss = importlib.import_module("raylora.loss")
    from raylora.config import AdapterConfig, DataConfig, FinetuneConfig, ModelConfig, TrainingConfig

    if liger_ops and not kernel_swaps.liger_ops_applied():
        raise RuntimeError(
            "a liger-ops row must run in a process where kernel_swaps.apply_liger_ops() ran first"
        )
    total = warmup + steps + extra_steps
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
    reporter = reporter or _TimingReporter(on_step=hook)
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    from raylora.training import train

    original = loss.chunkable_head
    if v0:
        loss.chunkable_head = lambda model: None  # the full-logits loss of the loop before issue 6
    cache_key = (shape, targets, mode, compile_mode, tuple(sorted(training.items())), liger_ops, ao_fp8)
    try:
        with (
            kernel_swaps.patched(ao_fp8=ao_fp8),
            compile_cache(cache_key, warm_cache, work.parent),
        ):
            train(config, reporter=reporter)
    finally:
        loss.chunkable_head = original
    return {
        "tokens": reporter.seen[warmup + steps] - reporter.seen[warmup],
        "seconds": reporter.times[warmup + steps] - reporter.times[warmup],
        "losses": reporter.losses,
        "first_step_at": reporter.times[1],
        "loop_peak_gib": reporter.peak,
        "dynamo_graphs": counters["stats"]["unique_graphs"] - graphs_before,
    }


# ---- one row ------------------------------------------------------------------------------------------------

_CEILINGS: dict[str, float] | None = None


def measure(row: Row, ckpt: Path, data: Path, a, *, cache: str) -> dict:
    """Train one row; its numbers, or the exact error it failed with (one row's failure loses no other)."""
    global _CEILINGS
    impl = parse_impl(row.impl)
    result: dict = {"impl": row.impl, "shape": row.shape, "targets": row.targets, "mode": row.mode}
    result["cache"] = "warm" if impl.options.get("warm_cache") else cache
    profiled = row.impl in a.profile.split(",")
    if profiled and _CEILINGS is None:
        _CEILINGS = step_profile.measure_ceilings()  # before the peak-memory baseline below
    work = Path(tempfile.mkdtemp(prefix=f"{row.impl}-", dir=a.workdir))
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if CUDA else 0
    started = time.perf_counter()
    try:
        profiler = step_profile.StepProfiler(after=a.warmup + a.steps) if profiled else None
        hook = profiler.step if profiler else None
        extra = profiler.EXTRA_STEPS if profiler else 0
        args = (row.shape, row.targets, row.mode, ckpt)
        with profiler or contextlib.nullcontext():
            if impl.loop == "hf":
                out = run_anchor(*args, a.warmup, a.steps, work, hook=hook, extra_steps=extra, **impl.options)
            elif impl.loop == "unsloth":
                out = run_unsloth(
                    *args, a.warmup, a.steps, work, hook=hook, extra_steps=extra, **impl.options
                )
            else:
                out = run_raylora(
                    *args, data, a.warmup, a.steps, work, hook=hook, extra_steps=extra, **impl.options
                )
        first_step_s = out.pop("first_step_at") - started
        flops, frozen, trainable = flops_per_token(row.shape, row.targets)
        tps = out["tokens"] / out["seconds"]
        result.update(
            out,
            tokens_per_s=tps,
            step_s=out["seconds"] / a.steps,
            first_step_s=first_step_s,
            mfu=tps * flops / PEAK_FLOPS,
            peak_gib=(torch.cuda.max_memory_allocated() - before) / 2**30 if CUDA else math.nan,
            reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if CUDA else math.nan,
            flops_per_token=flops,
            trainable_params=trainable,
        )
        if profiler is not None:
            parts = flops_parts(row.shape, row.targets)
            tokens_per_step = SHAPES[row.shape]["batch"] * SEQ
            result["profile"] = profiler.summary(
                parts["total"] * tokens_per_step,
                parts["attention"] * tokens_per_step,
                _CEILINGS or {},
                fp8_frozen_flops_per_step=parts["frozen_decoder"] * tokens_per_step if impl.fp8 else 0.0,
            )
            log(
                step_profile.format_summary(
                    f"{row.shape} {row.targets} {row.mode} {row.impl}", result["profile"]
                )
            )
    except Exception as error:  # an OOM or a library failure in one row must not lose the others
        detail = traceback.format_exc()
        log(detail)
        result["error"] = exact_error(error)
        result["error_detail"] = detail[-3000:]
    result["wall_s"] = time.perf_counter() - started
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    shutil.rmtree(work, ignore_errors=True)
    result["left_allocated_gib"] = (torch.cuda.memory_allocated() - before) / 2**30 if CUDA else 0.0
    return result


def exact_error(error: BaseException) -> str:
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0][:300] if message else ''}"


def import_check(impl: Impl) -> str:
    """Without a GPU: whether the row's library at least imports (and has the API used here)."""
    try:
        if impl.options.get("head_loss") == "liger" or impl.options.get("liger_ops"):
            kernel_swaps.check_liger()
        return "import OK"
    except Exception as error:
        return f"import failed: {exact_error(error)}"


def not_run(row: Row, why: str, **extra) -> dict:
    return {
        "impl": row.impl,
        "shape": row.shape,
        "targets": row.targets,
        "mode": row.mode,
        "skipped": why,
        **extra,
    }


def emit(result: dict, json_path: str | None) -> None:
    shown = {k: v for k, v in result.items() if k not in ("losses", "error_detail", "profile")}
    log(f"ROW {json.dumps(shown)}")
    if json_path:
        with open(json_path, "a") as handle:
            handle.write(json.dumps(result) + "\n")


# ---- child processes: the rows whose library patches transformers process-wide -------------------------------

_CUDA_BROKEN = (
    "CUDA error",
    "illegal memory access",
    "AcceleratorError",
    "CUBLAS_STATUS",
    "device-side assert",
)


def child_main(a) -> None:
    """Run `a.rows_file`'s rows of one family in this (fresh) process, one JSON line each to `a.result_file`."""
    rows = [Row(**r) for r in json.loads(Path(a.rows_file).read_text())]
    started = time.perf_counter()
    import_error = None
    try:
        if a.child == "unsloth":
            import unsloth  # noqa: F401  (first: it patches transformers, peft and trl as they are imported)
        elif a.child == "liger":
            kernel_swaps.apply_liger_ops()
        else:
            raise ValueError(f"unknown child family {a.child!r}")
    except Exception as error:
        log(traceback.format_exc())
        import_error = f"import failed: {exact_error(error)}"
    import_s = time.perf_counter() - started
    log(f"[{a.child} process] library import {'failed' if import_error else 'done'} in {import_s:.1f}s")
    first = True
    for row in rows:
        if import_error:
            result = not_run(row, import_error, error=import_error, import_s=import_s)
        elif time.time() > a.deadline_at:
            result = not_run(row, "--deadline-s reached before this row started")
        elif not CUDA:
            result = not_run(
                row, f"no CUDA device ({parse_impl(row.impl).needs_gpu}); import OK", import_s=import_s
            )
        else:
            result = measure(row, Path(a.ckpt), Path(a.data), a, cache="cold" if first else "in-proc")
            result["import_s"] = import_s
            first = False
        emit(result, None)
        with open(a.result_file, "a") as handle:
            handle.write(json.dumps(result) + "\n")
        if any(marker in result.get("error", "") for marker in _CUDA_BROKEN):
            log(
                f"[{a.child} process] the CUDA context is unusable after this error; a new process takes over"
            )
            sys.exit(3)


def run_family(family: str, rows: list[Row], ckpt: Path, data: Path, a, deadline_at: float) -> list[dict]:
    """Run `rows` in child processes of `family`; a child that dies costs the row it was on, not the rest."""
    results: list[dict] = []
    remaining = list(rows)
    while remaining:
        if time.time() > deadline_at:
            results += [not_run(r, "--deadline-s reached before this row started") for r in remaining]
            for r in results[-len(remaining) :]:
                emit(r, None)
            break
        scratch = Path(tempfile.mkdtemp(prefix=f"child-{family}-", dir=a.workdir))
        rows_file, result_file = scratch / "rows.json", scratch / "results.jsonl"
        rows_file.write_text(json.dumps([r.__dict__ for r in remaining]))
        env = dict(os.environ)
        env.update(
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            UNSLOTH_DISABLE_STATISTICS="1",
            TOKENIZERS_PARALLELISM="false",
            # the child's first row compiles from empty caches, as a fresh node's first trial does
            TORCHINDUCTOR_CACHE_DIR=str(scratch / "inductor"),
            TRITON_CACHE_DIR=str(scratch / "triton"),
        )
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child", family,
            "--rows-file", str(rows_file),
            "--result-file", str(result_file),
            "--ckpt", str(ckpt),
            "--data", str(data),
            "--deadline-at", repr(deadline_at),
            "--warmup", str(a.warmup),
            "--steps", str(a.steps),
            "--seq", str(SEQ),
            "--workdir", str(scratch),
            "--profile", a.profile,
        ]  # fmt: skip
        log(f"[{family} process] starting for {len(remaining)} rows")
        tail: collections.deque[str] = collections.deque(maxlen=30)
        # cwd: Unsloth writes a compiled-code cache into the working directory
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=scratch
        ) as child:
            # A child still busy `--grace-s` after the deadline (a hung import, a slow row) is ended, so that
            # this process prints its tables inside the call's limit.
            watchdog = threading.Timer(max(deadline_at + a.grace_s - time.time(), 0.0), child.kill)
            if math.isfinite(deadline_at):
                watchdog.start()
            assert child.stdout is not None
            for line in child.stdout:
                print(line, end="", flush=True)
                tail.append(line.rstrip())
            code = child.wait()
            watchdog.cancel()
        done = (
            [json.loads(line) for line in result_file.read_text().splitlines()]
            if result_file.exists()
            else []
        )
        results += done
        remaining = remaining[len(done) :]
        if remaining and code != 3:
            row = remaining.pop(0)
            why = f"the {family} process exited with code {code} on this row (or its library import)"
            if code < 0 and time.time() >= deadline_at + a.grace_s:
                why += f", ended when still running {a.grace_s:.0f}s after --deadline-s"
            result = not_run(row, why, error=why, error_detail="\n".join(tail))
            emit(result, None)
            results.append(result)
        shutil.rmtree(scratch, ignore_errors=True)
    return results


# ---- tables -----------------------------------------------------------------------------------------------


def _ok(r: dict | None) -> bool:
    return r is not None and "tokens_per_s" in r


def fastest_anchors(rows: list[dict]) -> dict[tuple, dict]:
    """The anchor row with the most tokens/s of each (shape, targets, mode), among those that ran."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if _ok(r) and parse_impl(r["impl"]).is_anchor:
            key = (r["shape"], r["targets"], r["mode"])
            if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
                best[key] = r
    return best


def table(rows: list[dict]) -> str:
    best = fastest_anchors(rows)
    bf16 = {(r["shape"], r["targets"], r["impl"]): r for r in rows if r["mode"] == "lora"}
    head = (
        f"{'shape':5} {'targets':10} {'mode':5} {'impl':22} {'tok/s':>8} {'MFU':>6} {'peak GiB':>8} "
        f"{'1st step s':>10} {'cache':>8} {'x fastest anchor tok/s, mem':>32} {'x bf16 tok/s':>12} "
        f"{'x bf16 mem':>10} {'loss first->last':>17}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        key = f"{r['shape']:5} {r['targets']:10} {r['mode']:5} {r['impl']:22}"
        if not _ok(r):
            lines.append(f"{key} {r.get('error') or 'not run: ' + r.get('skipped', '?')}")
            continue
        a = best.get((r["shape"], r["targets"], r["mode"]))
        b = bf16.get((r["shape"], r["targets"], r["impl"])) if r["mode"] == "qlora" else None

        def ratio(x, ref, k):
            return f"{x[k] / ref[k]:.2f}x" if _ok(ref) and ref[k] == ref[k] and ref[k] else "-"

        vs = f"{ratio(r, a, 'tokens_per_s')}, {ratio(r, a, 'peak_gib')} ({a['impl']})" if a else "-"
        losses = r.get("losses") or [math.nan]
        star = "*" if parse_impl(r["impl"]).fp8 else " "
        lines.append(
            f"{key} {r['tokens_per_s']:8.0f} {100 * r['mfu']:5.1f}%{star}{r['peak_gib']:8.1f} "
            f"{r['first_step_s']:10.1f} {r['cache'][:8]:>8} {vs:>32} "
            f"{ratio(r, b, 'tokens_per_s'):>12} {ratio(r, b, 'peak_gib'):>10} "
            f"{losses[0]:8.3f}->{losses[-1]:.3f}"
        )
    lines.append("* FP8 rows: the same FLOPs over the bf16 peak (bf16-equivalent MFU).")
    return "\n".join(lines)


def goals(rows: list[dict]) -> str:
    """Issue 18's goals, each met or missed with its figure, against the fastest anchor of the row."""
    best = fastest_anchors(rows)
    by = {(r["shape"], r["targets"], r["mode"], r["impl"]): r for r in rows}
    lines = [
        f"goals (issue 18): raylora defaults >= {GOAL_SPEED}x the fastest anchor's tokens/s and <= {GOAL_MEMORY}x "
        f"its peak on every LoRA row; fp8=True >= {GOAL_FP8_SPEED}x on the 8B LoRA rows; QLoRA >= "
        f"{GOAL_QLORA_SPEED}x the fastest 4-bit anchor at no more memory"
    ]
    for (shape, targets, mode), anchor in sorted(best.items()):
        checks = [
            (
                "raylora",
                GOAL_SPEED if mode == "lora" else GOAL_QLORA_SPEED,
                GOAL_MEMORY if mode == "lora" else 1.0,
            )
        ]
        if mode == "lora" and shape == "8b":
            checks.append(("raylora-fp8", GOAL_FP8_SPEED, None))
        for impl, speed, memory in checks:
            r = by.get((shape, targets, mode, impl))
            if not _ok(r):
                lines.append(f"  {shape} {targets} {mode} {impl}: no measurement")
                continue
            s, m = r["tokens_per_s"] / anchor["tokens_per_s"], r["peak_gib"] / anchor["peak_gib"]
            met = s >= speed and (memory is None or m <= memory)
            lines.append(
                f"  {shape} {targets:10} {mode:5} {impl:12} vs {anchor['impl']:22} {s:.2f}x tokens/s "
                f"(goal {speed}x), {m:.2f}x peak"
                + (f" (goal <= {memory}x)" if memory else "")
                + f": {'MET' if met else 'MISSED'}"
            )
    return "\n".join(lines)


def compile_payoff(rows: list[dict], trial_steps: int = 200) -> str:
    """Does compiling pay for itself in a `trial_steps`-step trial? From each pair of a compiled and an eager
    row of the same shape, targets and mode: compile overhead = (first-step latency - one steady step),
    compiled minus eager; saving = eager step - compiled step; break-even = overhead / saving."""
    by = {(r["shape"], r["targets"], r["mode"], r["impl"]): r for r in rows if _ok(r)}
    lines = [
        f"compile=auto against compile=off: first-step latency (load + compile + step 1) and steady step; "
        f"break-even steps = extra first-step cost / saving per step; a {trial_steps}-step trial's time "
        f"= first-step latency + {trial_steps - 1} steady steps"
    ]
    for (shape, targets, mode, impl), eager in sorted(by.items()):
        if impl != "raylora-eager":
            continue
        for compiled_impl in ("raylora", "raylora-warm"):
            c = by.get((shape, targets, mode, compiled_impl))
            if c is None:
                continue
            overhead = (c["first_step_s"] - c["step_s"]) - (eager["first_step_s"] - eager["step_s"])
            saving = eager["step_s"] - c["step_s"]
            total_c = c["first_step_s"] + (trial_steps - 1) * c["step_s"]
            total_e = eager["first_step_s"] + (trial_steps - 1) * eager["step_s"]
            if saving <= 0:
                even = "never (the compiled step is not faster)"
            else:
                even = f"{max(overhead, 0.0) / saving:.0f}"
            lines.append(
                f"  {shape} {targets:10} {mode:5} {compiled_impl:12} ({c['cache']}): compile costs "
                f"{overhead:.1f}s, saves {1e3 * saving:.0f} ms/step ({c['step_s'] * 1e3:.0f} vs "
                f"{eager['step_s'] * 1e3:.0f} ms); break-even after {even} steps; {trial_steps} steps: "
                f"{total_c:.0f}s compiled vs {total_e:.0f}s eager -> "
                f"{'compile pays off' if total_c < total_e else 'eager is faster'}"
            )
    return "\n".join(lines) if len(lines) > 1 else lines[0] + "\n  (no raylora / raylora-eager pair ran)"


# (library row, hand-written baseline): benchmarks/kernel_swaps.py says what each swaps.
LIBRARY_PAIRS = [
    ("raylora-liger-ce", "raylora-chunked-ce"),
    ("raylora-liger-ops", "raylora"),
    ("raylora-liger-eager", "raylora"),
    ("raylora-liger-eager", "raylora-eager"),
    ("raylora-ao-fp8", "raylora-fp8"),
]


def library_pairs(rows: list[dict]) -> str:
    by = {(r["shape"], r["targets"], r["mode"], r["impl"]): r for r in rows if _ok(r)}
    lines = ["library kernels against raylora's own (tokens/s and peak ratio, first-step latency)"]
    for (shape, targets, mode, impl), r in sorted(by.items()):
        for library, baseline in LIBRARY_PAIRS:
            b = by.get((shape, targets, mode, baseline))
            if impl != library or b is None:
                continue
            s, m = r["tokens_per_s"] / b["tokens_per_s"], r["peak_gib"] / b["peak_gib"]
            lines.append(
                f"  {shape} {targets:10} {mode:5} {library:20} / {baseline:14} {s:.3f}x tokens/s, {m:.2f}x peak; "
                f"first step {r['first_step_s']:.1f}s vs {b['first_step_s']:.1f}s -> "
                f"{'library faster' if s > 1 else 'raylora faster'}"
            )
    return "\n".join(lines) if len(lines) > 1 else lines[0] + "\n  (no pair ran)"


# ---- main -------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1b", help="comma list of 1b, 8b (small, tiny: CPU checks)")
    p.add_argument("--targets", default="attention,all-linear")
    p.add_argument("--modes", default="lora,qlora")
    p.add_argument("--impls", default="anchor,raylora-eager,raylora", help="comma list; see the docstring")
    p.add_argument("--seq", type=int, default=SEQ, help="sequence length (2048; smaller only for dry runs)")
    p.add_argument(
        "--skip", default="", help="comma list of impl/mode, impl/targets or impl/mode/targets not to run"
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profile", default="", help="comma list of impls whose rows are also profiled")
    p.add_argument(
        "--deadline-s",
        type=float,
        default=math.inf,
        help="start no row later than this many seconds after the start (rows after it: 'not run')",
    )
    p.add_argument(
        "--grace-s",
        type=float,
        default=60.0,
        help="end a child process still running this many seconds after the deadline",
    )
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "raylora-bench"))
    p.add_argument("--json", default=None, help="append one JSON line per row here")
    # a child process (see run_family)
    for name in ("--child", "--rows-file", "--result-file", "--ckpt", "--data"):
        p.add_argument(name, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline-at", type=float, default=math.inf, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    problems = []
    for name, value, known in (
        ("--shapes", a.shapes, SHAPES),
        ("--modes", a.modes, MODES),
        ("--targets", a.targets, TARGETS),
    ):
        for item in value.split(","):
            if item not in known:
                problems.append(f"{name}: {item!r} is not one of {', '.join(known)}")
    for item in [*a.impls.split(","), *filter(None, a.profile.split(","))]:
        try:
            parse_impl(item)
        except ValueError as error:
            problems.append(f"--impls/--profile: {error}")
    for entry in filter(None, a.skip.split(",")):
        try:
            check_skip(entry)
        except ValueError as error:
            problems.append(str(error))
    if a.warmup < 1 or a.steps < 1:
        problems.append(f"--warmup and --steps must be >= 1, got {a.warmup} and {a.steps}")
    if problems:
        p.error("; ".join(problems))
    return a


def main() -> None:
    global SEQ
    a = parse_args()
    SEQ = a.seq
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.child:
        child_main(a)
        return
    deadline_at = time.time() + a.deadline_s
    a.workdir = str(Path(a.workdir).resolve())  # absolute: child processes run in directories of their own
    root = Path(a.workdir)
    root.mkdir(parents=True, exist_ok=True)
    import peft
    import transformers

    log(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"python {sys.version.split()[0]}, GPU {torch.cuda.get_device_name() if CUDA else 'none (CPU)'}"
    )
    data = write_data(root, records=256)
    impls = a.impls.split(",")
    rows: list[dict] = []
    for shape in a.shapes.split(","):
        planned = plan_rows(
            shape, a.modes.split(","), a.targets.split(","), impls, list(filter(None, a.skip.split(",")))
        )
        ckpt = build_checkpoint(shape, root)
        done: dict[Row, dict] = {}
        for family, segment in segments(impls):
            members = [r for impl in segment for r in planned if r.impl == impl]
            if family != "main":
                for r, result in zip(
                    members, run_family(family, members, ckpt, data, a, deadline_at), strict=True
                ):
                    done[r] = result
                    if a.json:
                        with open(a.json, "a") as handle:
                            handle.write(json.dumps(result) + "\n")
                continue
            for r in members:
                impl = parse_impl(r.impl)
                if time.time() > deadline_at:
                    result = not_run(r, "--deadline-s reached before this row started")
                elif not CUDA and impl.needs_gpu:
                    result = not_run(r, f"no CUDA device ({impl.needs_gpu}); {import_check(impl)}")
                else:
                    result = measure(r, ckpt, data, a, cache="cold")
                emit(result, a.json)
                done[r] = result
        rows += [done[r] for r in planned]
        shutil.rmtree(ckpt, ignore_errors=True)
        for directory in _CACHE_DIRS.values():
            shutil.rmtree(directory, ignore_errors=True)
        _CACHE_DIRS.clear()
    log("")
    log(f"seq {SEQ}; warm-up {a.warmup} steps, timed {a.steps}; MFU over {PEAK_FLOPS:.3g} FLOP/s")
    log(table(rows))
    log("")
    log(goals(rows))
    log("")
    log(compile_payoff(rows))
    log("")
    log(library_pairs(rows))
    for r in rows:
        if "profile" in r:
            log("")
            log(
                step_profile.format_summary(
                    f"{r['shape']} {r['targets']} {r['mode']} {r['impl']}", r["profile"]
                )
            )


if __name__ == "__main__":
    main()
