"""The GPU benchmark's own arithmetic and bookkeeping, on the CPU: the verdicts it prints must follow from
its numbers (compile break-even, goals against the fastest anchor), its rows must be the ones asked for,
and its library swaps must not outlive the row that asked for them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kernel_swaps  # noqa: E402
import scaling  # noqa: E402
import step_profile  # noqa: E402
import throughput as tp  # noqa: E402


def _row(impl: str, targets: str = "attention", mode: str = "lora", **numbers) -> dict:
    return {"impl": impl, "shape": "8b", "targets": targets, "mode": mode, "cache": "cold", **numbers}


def test_compile_break_even_counts_the_extra_first_step_cost_over_the_per_step_saving():
    rows = [
        _row("raylora", tokens_per_s=2.0, peak_gib=1.0, first_step_s=30.0, step_s=0.5),
        _row("raylora-eager", tokens_per_s=1.0, peak_gib=1.0, first_step_s=10.0, step_s=0.7),
    ]
    # compile costs (30 - 0.5) - (10 - 0.7) = 20.2 s and saves 0.2 s a step: even after 101 steps
    text = tp.compile_payoff(rows, trial_steps=200)
    assert "costs 20.2s, saves 200 ms/step" in text
    assert "break-even after 101 steps" in text
    assert "200 steps: 130s compiled vs 149s eager -> compile pays off" in text
    assert "eager is faster" in tp.compile_payoff(rows, trial_steps=50)

    slower = [rows[0] | {"step_s": 0.8}, rows[1]]
    assert "never (the compiled step is not faster)" in tp.compile_payoff(slower)


def test_goals_are_judged_against_the_fastest_anchor_that_ran():
    anchors = [
        _row("anchor", tokens_per_s=1000.0, peak_gib=50.0),
        _row("anchor-liger", tokens_per_s=1500.0, peak_gib=20.0),
        _row("anchor-unsloth-nockpt", error="ModuleNotFoundError: No module named 'xformers'"),
    ]
    # 1.8x the plain anchor, but 1.2x the Liger anchor: missed
    text = tp.goals([*anchors, _row("raylora", tokens_per_s=1800.0, peak_gib=17.0)])
    assert "vs anchor-liger" in text and "1.20x tokens/s (goal 1.3x), 0.85x peak" in text
    assert "MISSED" in text and "MET" not in text
    met = tp.goals([*anchors, _row("raylora", tokens_per_s=2000.0, peak_gib=17.0)])
    assert "1.33x tokens/s" in met and ": MET" in met
    # faster but heavier than the fastest anchor: the memory goal alone misses it
    assert "MISSED" in tp.goals([*anchors, _row("raylora", tokens_per_s=2000.0, peak_gib=19.0)])


def test_rows_follow_impls_skips_and_segments():
    impls = ["raylora", "raylora-fp8", "anchor-liger", "raylora-liger-ops", "anchor-unsloth", "raylora-eager"]
    skip = ["anchor-unsloth/lora", "raylora-eager/qlora/all-linear"]
    rows = tp.plan_rows("8b", ["lora", "qlora"], ["attention", "all-linear"], impls, skip)
    have = {(r.mode, r.targets, r.impl) for r in rows}
    assert ("qlora", "attention", "raylora-fp8") not in have  # fp8 and QLoRA exclude each other
    assert not any(impl == "anchor-unsloth" and mode == "lora" for mode, _, impl in have)
    assert ("qlora", "attention", "raylora-eager") in have
    assert ("qlora", "all-linear", "raylora-eager") not in have
    assert ("lora", "all-linear", "raylora-eager") in have
    assert tp.segments(impls) == [
        ("main", ["raylora", "raylora-fp8"]),
        ("liger", ["anchor-liger", "raylora-liger-ops"]),
        ("unsloth", ["anchor-unsloth"]),
        ("main", ["raylora-eager"]),
    ]
    for bad in (["--impls", "raylora,anchor-unslot"], ["--skip", "raylora/bf16"], ["--modes", "qlora4"]):
        with pytest.raises(SystemExit):
            tp.parse_args(bad)


def test_library_swap_ends_with_its_row(monkeypatch):
    import raylora.recipe as recipe

    own_loss, own_fp8 = recipe.token_loss_sum, recipe.convert_to_float8
    with pytest.raises(RuntimeError, match="row failed"), kernel_swaps.patched(ao_fp8=True):
        assert recipe.convert_to_float8 is kernel_swaps.torchao_convert_to_float8
        raise RuntimeError("row failed")
    assert recipe.convert_to_float8 is own_fp8 and recipe.token_loss_sum is own_loss


@pytest.mark.parametrize(
    ("kernel", "kind"),
    [
        ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
        ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("triton_tem_fused_mm_0", "matmul"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", "attention"),
        (
            "triton_red_fused__to_copy__unsafe_view_add_div_expand_mul_native_dropout_backward_0",
            "elementwise/fused",
        ),
        ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>", "dequant 4-bit"),
        ("void at::native::multi_tensor_apply_kernel<FusedAdamWMathFunctor>", "optimizer"),
        ("Memcpy HtoD (Pageable -> Device)", "copy/fill"),
    ],
)
def test_profile_kernel_classes(kernel, kind):
    assert step_profile.kernel_class(kernel) == kind


def test_the_streamed_checkpoint_loads_as_written_and_is_counted_right(tmp_path):
    # The base no GPU holds is written one layer at a time; its small twin must load through the user's
    # path (`from_pretrained`) with every tensor present and the size the benchmark prints.
    from raylora.config import ModelConfig
    from raylora.model import load_base_model

    ckpt = scaling.write_streamed_checkpoint("tiny-70b", tmp_path, layers=3)
    base = load_base_model(ModelConfig(name_or_path=str(ckpt), dtype="bfloat16"), qlora=False)
    config = scaling.shape_config("tiny-70b", 3)
    assert base.config.num_hidden_layers == 3
    assert sum(p.numel() for p in base.parameters()) == scaling.parameter_count(config, tp.VOCAB)
    assert float(base.model.norm.weight.float().mean()) == 1.0
    assert 0.015 < float(base.lm_head.weight.float().std()) < 0.025
    # the full-size shape: more than one H200 (139 GiB) holds in bf16
    big = scaling.parameter_count(scaling.shape_config("70b", None), tp.VOCAB)
    assert 79.0e9 < big < 79.2e9 and big * 2 / 2**30 > 139
