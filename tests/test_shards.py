"""Sharded loading on a real 2-rank gloo group (torch.multiprocessing): each rank holds its part of the base,
the same base and adapter one worker loads, and the loss of one step takes the chunked head path.

The Ray side (Tune -> TorchTrainer) of N-worker trials is tested in tests/test_sweep.py; this file checks
the sharding itself in two processes, which is faster than a TorchTrainer and sees inside the ranks.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raylora.config import FinetuneConfig, demo_config

CASES = {
    "bf16": {"model.dtype": "bfloat16"},
    # Input and output embeddings tied (Llama-3.2-1B's layout): one parameter, kept in the root unit.
    "tied": {"model.dtype": "bfloat16", "model.name_or_path": "{tied}"},
    "qlora": {"model.dtype": "bfloat16", "adapter.qlora": True, "training.activation_checkpointing": 0.0},
    "fp8": {"model.dtype": "bfloat16", "training.fp8": True},
}


def _tied_checkpoint(root: Path) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from raylora.tiny import materialize_preset

    tokenizer = AutoTokenizer.from_pretrained(materialize_preset("tiny-llama"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(root / "tied")
    tokenizer.save_pretrained(root / "tied")
    return str(root / "tied")


def _config(case: str, batch_size: int, output_dir: str) -> FinetuneConfig:
    tied = str(Path(output_dir).parent / "tied")
    overrides = {k: v.format(tied=tied) if isinstance(v, str) else v for k, v in CASES[case].items()}
    config = demo_config().with_overrides(
        {
            **overrides,
            "adapter.modules_to_save": [],  # a frozen head: the loss applies it in chunks
            "adapter.dropout": 0.1,
            "training.batch_size": batch_size,
            "training.precision": "bf16",
            "training.compile": "off",
        }
    )
    config.training.output_dir = output_dir
    return config


def _snapshot(recipe) -> dict:
    """What one step on this process computed, and the parameters it holds (its shards under FSDP2)."""
    from raylora.loss import forward

    initial = {
        name: (p.to_local() if hasattr(p, "to_local") else p).detach().clone()
        for name, p in recipe.model.named_parameters()
    }
    batches = recipe.next_batches()
    with recipe.autocast:
        chunked = forward(recipe.model, batches[0]).head is not None
    loss = recipe.step(batches)["train_loss"]
    head = recipe.model.get_base_model().get_output_embeddings()
    return {
        "state": initial,
        "loss": loss,
        "chunked": chunked,
        "head_resharded": type(head.weight).__name__ == "DTensor",
        "parameter_bytes": recipe.parameter_bytes,
    }


def _rank(rank: int, world: int, init_file: str, out: str) -> None:
    from raylora.recipe import LoraRecipe

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for case in CASES:
            recipe = LoraRecipe(_config(case, batch_size=2, output_dir=f"{out}/{case}-{rank}"))
            recipe.setup()
            snap = _snapshot(recipe)
            torch.save(snap, f"{out}/{case}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    _tied_checkpoint(out)
    init_file = Path(tempfile.mkdtemp()) / "init"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank, args=(2, str(init_file), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_loads_its_half_of_the_base_and_one_worker_s_adapter(two_ranks, case):
    from raylora.recipe import LoraRecipe

    ranks = [torch.load(two_ranks / f"{case}-rank{r}.pt", weights_only=False) for r in range(2)]
    single = LoraRecipe(_config(case, batch_size=4, output_dir=str(two_ranks / f"{case}-single")))
    single.setup()
    one = _snapshot(single)

    # The same base (bf16 rows, 4-bit packed bytes, fp8 values) and the same initial adapter, bit for bit.
    halves = [snap["state"] for snap in ranks]
    assert set(halves[0]) == set(one["state"])
    for name, tensor in one["state"].items():
        joined = torch.cat([halves[0][name], halves[1][name]])
        # Compared as bytes: a packed 4-bit weight read as bf16 holds NaN patterns, which never equal.
        assert torch.equal(joined.view(torch.uint8), tensor.view(torch.uint8)), name
    # Each rank holds about half the parameter bytes (rows of odd-sized tensors round up on rank 0).
    for snap in ranks:
        assert 0.45 < snap["parameter_bytes"] / one["parameter_bytes"] < 0.55, snap["parameter_bytes"]
    # The loss applies the head a chunk at a time on 2 ranks too, and the head's gathered weight is freed
    # by the end of the step.
    assert all(snap["chunked"] for snap in ranks) and one["chunked"]
    assert all(snap["head_resharded"] for snap in ranks)
    # One step at equal global batch: the same mean loss (the ranks' sums, reduced in another order).
    assert ranks[0]["loss"] == ranks[1]["loss"]
    assert ranks[0]["loss"] == pytest.approx(one["loss"], rel=1e-3)
