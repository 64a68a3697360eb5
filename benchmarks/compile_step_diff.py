# PYTHONUNBUFFERED=1 python benchmarks/compile_step_diff.py --shape 1b
"""One optimizer step of raylora's loop, eager against compiled, on the same init and batch: where do they part?

Written when loss_parity.py showed the compiled loop's loss one step after the first update 0.026 nats
below the eager loop's and the anchor's (then within 0.003 from step 3 on), before the layers were compiled
with `emulate_precision_casts` (raylora.fastpath.compile_layers). This runs the loop's own pieces
(`raylora.loss.forward`, `token_loss_sum`, clipping, AdamW) for two steps in both modes and compares the step-1
gradients and the weights after the first update, for lora_A and lora_B separately.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loss_parity as lp  # noqa: E402
import throughput as tp  # noqa: E402


def run(config, batches, compile_mode: str) -> dict:
    from raylora.fastpath import compile_layers, install_lean_lora
    from raylora.loss import count_targets, forward, token_loss_sum
    from raylora.model import apply_lora, decoder_layers, load_base_model

    torch.manual_seed(0)
    base = load_base_model(config.model, qlora=False, device=tp.DEVICE)
    model, _ = apply_lora(base, config.adapter)
    install_lean_lora(model)
    model.to(tp.DEVICE)
    if compile_mode != "off":
        compile_layers(decoder_layers(model), compile_mode)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    init = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=lp.LR, weight_decay=0.0)
    model.train()
    out: dict = {"init": init, "losses": []}
    for step, batch in enumerate(batches[:3]):
        batch = {k: v.to(tp.DEVICE) for k, v in batch.items()}
        with torch.autocast("cuda" if tp.CUDA else "cpu", dtype=torch.bfloat16):
            output = forward(model, batch)
        n = count_targets(batch)
        loss = token_loss_sum(output, batch["labels"], 0.0)
        (loss / n).backward()
        out["losses"].append(float(loss) / n)
        if step == 0:
            out["grads"] = {k: p.grad.detach().clone() for k, p in params.items()}
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            out["after1"] = {k: p.detach().clone() for k, p in params.items()}
    del model, base, optimizer
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1b")
    p.add_argument("--seq", type=int, default=tp.SEQ)
    p.add_argument("--compile", default="inductor")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "raylora-bench"))
    a = p.parse_args()
    tp.SEQ = a.seq
    root = Path(a.workdir)
    root.mkdir(parents=True, exist_ok=True)
    ckpt = tp.build_checkpoint(a.shape, root)
    data = tp.write_data(root, records=512)
    config = lp.raylora_config(ckpt, data, 3, tp.SHAPES[a.shape]["batch"], 0.0, root / "diff", "off")
    batches, _ = lp.raylora_batches_and_init(config)
    eager = run(config, batches, "off")
    compiled = run(config, batches, a.compile)
    tp.log(f"losses eager {eager['losses']}\nlosses compiled {compiled['losses']}")
    for kind in ("lora_A", "lora_B"):
        keys = [k for k in eager["grads"] if kind in k]

        def stack(d, keys=keys):
            return torch.cat([d[k].float().flatten() for k in keys])

        ge, gc = stack(eager["grads"]), stack(compiled["grads"])
        ie, ic = stack(eager["init"]), stack(compiled["init"])
        we, wc = stack(eager["after1"]), stack(compiled["after1"])
        tp.log(
            f"{kind}: init equal {torch.equal(ie, ic)}; step-1 grad norm eager {ge.norm():.6g} compiled "
            f"{gc.norm():.6g}, |diff| {(ge - gc).norm():.3g}, nonzero eager {int((ge != 0).sum())} compiled "
            f"{int((gc != 0).sum())} of {ge.numel()}, sign disagreements {int((ge.sign() != gc.sign()).sum())}; "
            f"moved by update 1: eager {(we - ie).norm():.4g} compiled {(wc - ic).norm():.4g}, weights |diff| "
            f"{(we - wc).norm():.4g}"
        )
        worst = max(
            keys,
            key=lambda k: (
                (eager["grads"][k] - compiled["grads"][k]).norm() / (eager["grads"][k].norm() + 1e-30)
            ),
        )
        e, c = eager["grads"][worst], compiled["grads"][worst]
        tp.log(
            f"  worst {kind} grad: {worst} rel diff {(e - c).norm() / (e.norm() + 1e-30):.3g} norms {e.norm():.4g} {c.norm():.4g}"
        )


if __name__ == "__main__":
    main()
