# python3 benchmarks/head_loss_parity.py
"""raylora's two head losses on one GPU, on the same inputs: Liger's fused linear cross-entropy
(`raylora.loss.liger_head_loss_and_grad`, the default where liger-kernel runs) against the written-out loss
(`head_loss_and_grad`, eager: fp32 logits), at a Llama-3 head (vocab 128256) over 4 x 2048 tokens.

The loss and the gradient w.r.t. the hidden states must agree within bf16 tolerance, stated here before the
run: the summed loss within 1e-3 relative, the gradient within 2e-2 of its largest entry (one bf16 rounding
of a value in [-1, 1] is up to 2^-8; the two sum the vocabulary in different orders). Exits 1 past either.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # raylora from this checkout

LOSS_RTOL = 1e-3
GRAD_TOL = 2e-2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    args = p.parse_args()

    from raylora.loss import IGNORE_INDEX, head_loss_and_grad, liger_available, liger_head_loss_and_grad

    if not torch.cuda.is_available() or not liger_available():
        sys.exit("needs a GPU and liger-kernel (pip install 'raylora[gpu]')")
    torch.manual_seed(0)
    device = torch.device("cuda")
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=torch.bfloat16)
    weight = (torch.randn(args.vocab, args.hidden, device=device) / args.hidden**0.5).to(torch.bfloat16)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    targets[::7] = IGNORE_INDEX  # some positions ignored, as padding and prompt tokens are
    rows = []
    for smoothing in (0.0, 0.1):
        ref_loss, ref_grad = head_loss_and_grad(hidden, weight, targets, smoothing, IGNORE_INDEX)
        loss, grad = liger_head_loss_and_grad(hidden, weight, targets, smoothing, IGNORE_INDEX)
        loss_rel = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
        grad_err = (grad.float() - ref_grad.float()).abs().max().item() / ref_grad.float().abs().max().item()
        rows.append(
            {
                "label_smoothing": smoothing,
                "loss_chunked": ref_loss.item(),
                "loss_liger": loss.item(),
                "loss_rel_diff": loss_rel,
                "grad_max_diff_over_max": grad_err,
                "pass": loss_rel <= LOSS_RTOL and grad_err <= GRAD_TOL,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    sys.exit(0 if all(r["pass"] for r in rows) else 1)


if __name__ == "__main__":
    main()
