# PYTHONUNBUFFERED=1 python benchmarks/loss_parity.py --shape 1b --steps 50 --json parity.jsonl
"""Loss parity (issue 6): raylora's loop against HF `Trainer` + PEFT on the same tokens, init and seed.

Both sides train the same random-init checkpoint (benchmarks/throughput.py builds it) for `--steps` steps on
the same token batches in the same order: the anchor is fed, through a sequential sampler, exactly the
batches that `raylora.data.iterate_batches` yields to raylora's loop for that seed (random-letter text, one
byte per token, 2048 tokens a row: the loss falls from ln(128256) ~ 11.8 towards the ~3.3 nats of 27
equiprobable letters, so the curve moves a lot in 50 steps). Same LoRA (r 16, alpha 32, attention
targets), the same initial LoRA weights (the anchor's are copied from a model built the way `train()` builds
it, with the same seed), AdamW at a constant 2e-4, no weight decay, gradient clipping at 1.0, bf16 autocast.

Runs, each a fresh model:
- `anchor p=0`, `raylora p=0`: no dropout; what is left is bf16 rounding (fused kernels, other reduction
  orders). The tolerance is stated before the run: every step within 0.02 nats (about 0.2-0.6% of the loss
  over this curve; a wrong gradient, scale or mask moves a 50-step curve by far more).
- `anchor p=0.05`, `raylora p=0.05`: LoRA dropout as configured. The anchor reseeds the RNG at every step
  as raylora's loop does, but its dropout runs on an fp32 copy of the input where raylora's runs on the bf16
  input, so the masks need not be the same bits; the reference for the difference is `anchor p=0.05 seed 1`,
  the anchor with other dropout masks only. Tolerance: raylora's largest per-step distance from the anchor
  at most 1.5x the anchor's own distance between its two mask seeds, plus 0.02 nats.
- `raylora-fp8 p=0` (with `--fp8`): `training.fp8=True`, the frozen base's linear layers in FP8. That is another
  function (weights and activations rounded to e4m3, gradients to e5m2), so the bf16 tolerance does not
  apply. Its tolerance, stated before the first run: every step within 1% of the anchor's loss, and the
  curve's fall over the run (first step's loss minus the last's) within 2% of the anchor's fall.
- Head losses and library kernels (run with `--runs`), without dropout: `raylora-liger-ce p=0` and
  `raylora-chunked-ce p=0` (`training.head_loss` "liger" and "chunked": on a GPU with liger-kernel,
  `raylora p=0` is the first, its default), `raylora-liger p=0` (Liger's head loss and
  Liger's RMSNorm, RoPE and SwiGLU, compiled layers), `raylora-liger-eager p=0` (the same, compile off):
  the same function as the anchor's, so the bf16 tolerance above applies: every step within 0.02 nats of
  `anchor p=0`. `raylora-ao-fp8 p=0` (training.fp8 through torchao's float8 training): the fp8 tolerance
  above. The Liger-ops runs patch transformers for the rest of the process, so they run after all others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_swaps  # noqa: E402
import throughput as tp  # noqa: E402  (the checkpoint and data builders of the throughput benchmark)

LR = 2e-4


def raylora_config(
    ckpt: Path,
    data: Path,
    steps: int,
    batch: int,
    dropout: float,
    work: Path,
    compile_mode: str,
    fp8: bool = False,
    head_loss: str = "auto",
):
    from raylora.config import AdapterConfig, DataConfig, FinetuneConfig, ModelConfig, TrainingConfig

    return FinetuneConfig(
        model=ModelConfig(name_or_path=str(ckpt), dtype="bfloat16", attn_implementation="sdpa"),
        data=DataConfig(path=str(data), format="text", max_length=tp.SEQ, packing=False, eval_fraction=0.05),
        adapter=AdapterConfig(r=16, alpha=32.0, dropout=dropout, target_modules="attention"),
        training=TrainingConfig(
            learning_rate=LR,
            max_steps=steps,
            batch_size=batch,
            warmup_steps=0,
            lr_schedule="constant",
            weight_decay=0.0,
            max_grad_norm=1.0,
            eval_every=steps,
            eval_batches=1,
            log_every=1,
            checkpoint_every=0,
            precision="bf16",
            output_dir=str(work),
            seed=0,
            compile=compile_mode,
            fp8=fp8,
            head_loss=head_loss,
        ),
    )


def raylora_batches_and_init(config) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The batches raylora's loop will see, and its initial LoRA weights, built as `train()` builds them."""
    from raylora.data import iterate_batches, load_data
    from raylora.model import apply_lora, load_base_model, load_tokenizer

    torch.manual_seed(config.training.seed)  # what train() does first; the same calls follow in its order
    tokenizer = load_tokenizer(config.model)
    data = load_data(config.data, tokenizer, seed=config.training.seed)
    base = load_base_model(config.model, qlora=False, device="cpu")
    model, _ = apply_lora(base, config.adapter)
    init = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
    del model, base
    batches = iterate_batches(
        data.train,
        batch_size=config.training.batch_size,
        seed=config.training.seed,
        pad_id=tokenizer.pad_token_id,
        start=0,
        rank=0,
        world_size=1,
    )
    return [next(batches) for _ in range(config.training.max_steps)], init


def run_anchor(
    ckpt: Path, batches, init, dropout: float, mask_seed: int, work: Path
) -> tuple[list[float], list[float]]:
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": tp.DEVICE}
    )
    model.config.use_cache = False
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=dropout, target_modules=tp.ATTENTION, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    state = dict(model.named_parameters())
    copied = 0
    for name, value in init.items():  # raylora's names are the same peft names
        with torch.no_grad():
            state[name].copy_(value)
        copied += 1
    assert copied == sum(1 for n in state if "lora_" in n), "LoRA weights missing from the copied init"
    rows = []
    for batch in batches:
        for i in range(batch["input_ids"].size(0)):
            rows.append({"input_ids": batch["input_ids"][i], "labels": batch["labels"][i]})
    losses: list[float] = []
    norms: list[float] = []

    class Reseed(TrainerCallback):
        # raylora reseeds dropout at every step from (seed, step, rank); the anchor does the same here.
        def on_step_begin(self, args, state, control, **kw):
            torch.manual_seed(mask_seed * 1_000_003 + state.global_step * 1009)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                norms.append(float(logs.get("grad_norm", "nan")))

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    args = TrainingArguments(
        output_dir=str(work / "anchor"),
        per_device_train_batch_size=batches[0]["input_ids"].size(0),
        max_steps=len(batches),
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        bf16=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=0,
        use_cpu=not tp.CUDA,
    )
    trainer = SequentialTrainer(model=model, args=args, train_dataset=rows, callbacks=[Reseed()])
    trainer.train()
    del trainer, model
    return losses, norms


def run_raylora(config, *, ao_fp8: bool = False) -> tuple[list[float], list[float]]:
    from raylora.training import train

    reporter = tp._TimingReporter()
    with kernel_swaps.patched(ao_fp8=ao_fp8):
        train(config, reporter=reporter)
    return reporter.losses, reporter.grad_norms


# name: (LoRA dropout, the anchor's dropout-mask seed, raylora's options). Listed in run order.
RUNS: dict[str, tuple[float, int, dict]] = {
    "anchor p=0": (0.0, 0, {}),
    "raylora p=0": (0.0, 0, {}),
    "anchor p=0.05": (0.05, 0, {}),
    "anchor p=0.05 seed 1": (0.05, 1, {}),
    "raylora p=0.05": (0.05, 0, {}),
    "raylora-eager p=0": (0.0, 0, {"compile_mode": "off"}),
    "raylora-fp8 p=0": (0.0, 0, {"fp8": True}),
    "raylora-ao-fp8 p=0": (0.0, 0, {"fp8": True, "ao_fp8": True}),
    "raylora-liger-ce p=0": (0.0, 0, {"head_loss": "liger"}),
    "raylora-chunked-ce p=0": (0.0, 0, {"head_loss": "chunked"}),
    # Liger's ops patch transformers process-wide: these run last (see the docstring)
    "raylora-liger p=0": (0.0, 0, {"liger_ops": True, "head_loss": "liger"}),
    "raylora-liger-eager p=0": (0.0, 0, {"liger_ops": True, "head_loss": "liger", "compile_mode": "off"}),
}
DEFAULT_RUNS = ["anchor p=0", "raylora p=0", "anchor p=0.05", "anchor p=0.05 seed 1", "raylora p=0.05"]
BF16_TOLERANCE = 0.02  # nats, every step, runs without dropout that compute the anchor's function


def main() -> None:
    global LR
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1b")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seq", type=int, default=tp.SEQ)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "raylora-bench"))
    p.add_argument("--json", default=None)
    p.add_argument("--compile", default="auto", help="raylora's training.compile")
    p.add_argument("--only-p0", action="store_true", help="only the two runs without dropout")
    p.add_argument(
        "--runs",
        default=None,
        help=f"comma list of run names (default: {', '.join(DEFAULT_RUNS)}); known: " + ", ".join(RUNS),
    )
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--fp8", action="store_true", help="also run raylora with training.fp8 (no dropout)")
    a = p.parse_args()
    wanted = a.runs.split(",") if a.runs else list(DEFAULT_RUNS)
    if a.only_p0:
        wanted = ["anchor p=0", "raylora p=0"]
    if a.fp8:
        wanted.append("raylora-fp8 p=0")
    unknown = [name for name in wanted if name not in RUNS]
    if unknown:
        p.error(f"--runs: unknown {unknown}; known: {', '.join(RUNS)}")
    LR = a.lr
    tp.SEQ = a.seq
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = Path(a.workdir)
    root.mkdir(parents=True, exist_ok=True)
    ckpt = tp.build_checkpoint(a.shape, root)
    data = tp.write_data(root, records=512)
    batch = tp.SHAPES[a.shape]["batch"]
    curves: dict[str, list[float]] = {}
    norms: dict[str, list[float]] = {}
    failed: dict[str, str] = {}
    for name, (dropout, mask_seed, options) in RUNS.items():
        if name not in wanted:
            continue
        options = dict(options)
        liger_ops = options.pop("liger_ops", False)
        if (liger_ops or options.get("head_loss") == "liger") and not tp.CUDA:
            tp.log(
                f"{name}: not run: Liger's kernels need a CUDA GPU ({tp.import_check(tp.parse_impl('raylora-liger-ops'))})"
            )
            continue
        if liger_ops and not kernel_swaps.liger_ops_applied():
            kernel_swaps.apply_liger_ops()  # one-way: every run from here on is a Liger-ops run (RUNS order)
        work = Path(tempfile.mkdtemp(dir=root))
        config = raylora_config(
            ckpt,
            data,
            a.steps,
            batch,
            dropout,
            work,
            options.pop("compile_mode", a.compile),
            fp8=options.pop("fp8", False),
            head_loss=options.pop("head_loss", "auto"),
        )
        started = time.perf_counter()
        try:
            if name.startswith("anchor"):
                batches, init = raylora_batches_and_init(config)
                curves[name], norms[name] = run_anchor(ckpt, batches, init, dropout, mask_seed, work)
            else:
                curves[name], norms[name] = run_raylora(config, **options)
        except Exception as error:  # one run's failure (a library that does not run here) loses no other
            tp.log(traceback.format_exc())
            failed[name] = tp.exact_error(error)
            tp.log(f"{name}: FAILED to run: {failed[name]}")
            continue
        tp.log(f"{name}: {len(curves[name])} steps in {time.perf_counter() - started:.0f}s")
        tp.log(f"  grad norm, first 4 steps: {[round(x, 5) for x in norms[name][:4]]}")
        if a.json:
            with open(a.json, "a") as handle:
                handle.write(
                    json.dumps({"run": name, "losses": curves[name], "grad_norms": norms[name]}) + "\n"
                )

    def gap(x: str, y: str) -> list[float]:
        return [abs(u - v) for u, v in zip(curves[x], curves[y], strict=True)]

    tp.log("\nstep " + " ".join(f"{n:>24}" for n in curves))
    for i in range(a.steps):
        tp.log(f"{i + 1:4d} " + " ".join(f"{curves[n][i]:24.4f}" for n in curves))
    tp.log("")
    if "anchor p=0" in curves:
        anchor = curves["anchor p=0"]
        for name in curves:
            if not name.startswith("raylora") or not name.endswith(" p=0"):
                continue
            if RUNS[name][2].get("fp8"):
                run = curves[name]
                relative = [abs(u - v) / v for u, v in zip(run, anchor, strict=True)]
                fall, fall_run = anchor[0] - anchor[-1], run[0] - run[-1]
                ok = max(relative) <= 0.01 and abs(fall_run - fall) <= 0.02 * abs(fall)
                tp.log(
                    f"{name}: max |run - anchor p=0| {max(gap('anchor p=0', name)):.4f} nats, "
                    f"{100 * max(relative):.2f}% of the anchor's loss (tolerance 1%); fall {fall_run:.4f} "
                    f"against the anchor's {fall:.4f} (tolerance 2%): {'PASS' if ok else 'FAIL'}"
                )
            else:
                exact = gap("anchor p=0", name)
                tp.log(
                    f"{name}: max |run - anchor p=0| {max(exact):.4f} nats (mean {sum(exact) / len(exact):.4f}); "
                    f"tolerance {BF16_TOLERANCE} at every step: {'PASS' if max(exact) <= BF16_TOLERANCE else 'FAIL'}"
                )
    for name, error in failed.items():
        tp.log(f"{name}: FAILED to run ({error}): no verdict")
    if {"anchor p=0.05", "anchor p=0.05 seed 1", "raylora p=0.05"} <= set(curves):
        noise = gap("anchor p=0.05", "anchor p=0.05 seed 1")
        ours = gap("anchor p=0.05", "raylora p=0.05")
        bound = 1.5 * max(noise) + BF16_TOLERANCE
        tp.log(
            f"p=0.05: max |raylora - anchor| {max(ours):.4f} (mean {sum(ours) / len(ours):.4f}); anchor's own "
            f"mask-seed spread max {max(noise):.4f} (mean {sum(noise) / len(noise):.4f}); "
            f"tolerance {bound:.4f}: {'PASS' if max(ours) <= bound else 'FAIL'}"
        )


if __name__ == "__main__":
    main()
