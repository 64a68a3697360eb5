"""Mixture-of-experts models: the routed experts (fused 3-D weights in transformers 5) are adapted through peft's
`target_parameters`, counted, trained, saved so that plain peft loads them, and quantised under QLoRA where
that can be done, with the rest said out loud.

Tiny Mixtral, Qwen3-MoE and Qwen2-MoE checkpoints are built from explicit configs here, so that expected
paths and parameter counts come from the dimensions below, not from the code under test.
"""

from __future__ import annotations

import pytest
import torch

from raylora.config import AdapterConfig, ConfigError, DataConfig, FinetuneConfig, ModelConfig, TrainingConfig
from raylora.model import (
    apply_lora,
    check_model,
    count_parameters,
    load_base_model,
    plan_model,
    unquantized_weights,
)
from raylora.targets import expert_parameters, resolve_target_modules, resolve_targets, router_layers

H, FFN, EXPERT_FFN, LAYERS, HEADS, KV_HEADS, EXPERTS, TOP_K = 64, 128, 32, 2, 4, 2, 4, 2
KV = H // HEADS * KV_HEADS
VOCAB = 320  # the tiny tokenizer's 259 tokens fit


def _configs():
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(
        hidden_size=H,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        num_experts_per_tok=TOP_K,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )
    return {
        "mixtral": MixtralConfig(**common, intermediate_size=EXPERT_FFN, num_local_experts=EXPERTS),
        "qwen3_moe": Qwen3MoeConfig(
            **common,
            head_dim=H // HEADS,
            intermediate_size=FFN,
            moe_intermediate_size=EXPERT_FFN,
            num_experts=EXPERTS,
        ),
        "qwen2_moe": Qwen2MoeConfig(
            **common,
            intermediate_size=FFN,
            moe_intermediate_size=EXPERT_FFN,
            shared_expert_intermediate_size=EXPERT_FFN,
            num_experts=EXPERTS,
        ),
    }


# Per architecture, inside one decoder layer: the MoE block and its linear layers besides the routed experts
# (Qwen2-MoE's shared expert; its `shared_expert_gate` is a router-like gate, never in a preset).
MOE_BLOCK = {"mixtral": "mlp", "qwen3_moe": "mlp", "qwen2_moe": "mlp"}
SHARED = {
    "mixtral": [],
    "qwen3_moe": [],
    "qwen2_moe": ["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"],
}
ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    from transformers import AutoModelForCausalLM

    from raylora.tiny import _build_tokenizer

    root = tmp_path_factory.mktemp("moe")
    paths = {}
    for arch, config in _configs().items():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(root / arch)
        _build_tokenizer().save_pretrained(root / arch)
        paths[arch] = str(root / arch)
    return paths


def _experts(arch: str) -> list[str]:
    return sorted(
        f"model.layers.{i}.{MOE_BLOCK[arch]}.experts.{p}"
        for i in range(LAYERS)
        for p in ("gate_up_proj", "down_proj")
    )


def _linear(arch: str, names: list[str]) -> list[str]:
    return [f"model.layers.{i}.{name}" for i in range(LAYERS) for name in names]


def _expert_lora_params(r: int) -> int:
    # peft's ParamWrapper: lora_A is in x (r * experts), lora_B (r * experts) x out, per fused weight;
    # gate_up_proj is [experts, 2 * ffn, hidden], down_proj [experts, hidden, ffn].
    gate_up = r * EXPERTS * (H + 2 * EXPERT_FFN)
    down = r * EXPERTS * (EXPERT_FFN + H)
    return LAYERS * (gate_up + down)


def _attention_lora_params(r: int) -> int:
    return LAYERS * r * ((H + H) + (H + KV) + (H + KV) + (H + H))


def _shared_lora_params(arch: str, r: int) -> int:
    if arch != "qwen2_moe":
        return 0
    return LAYERS * r * (2 * (H + EXPERT_FFN) + (EXPERT_FFN + H))


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_all_linear_adapts_the_routed_experts_and_counts_them(checkpoints, arch):
    base = load_base_model(ModelConfig(name_or_path=checkpoints[arch], dtype="float32"), qlora=False)
    assert sorted(expert_parameters(base)) == _experts(arch)
    targets = resolve_targets(base, "all-linear")
    assert list(targets.parameters) == _experts(arch)
    assert sorted(targets.modules) == sorted(_linear(arch, ATTENTION + [f"mlp.{s}" for s in SHARED[arch]]))
    # the routers are never in a preset; Qwen2-MoE's shared-expert gate is one of them
    assert router_layers(base) == (_linear(arch, ["mlp.shared_expert_gate"]) if arch == "qwen2_moe" else [])
    assert resolve_target_modules(base, "experts") == _experts(arch)
    assert resolve_target_modules(base, "mlp") == sorted(
        _experts(arch) + _linear(arch, [f"mlp.{s}" for s in SHARED[arch]])
    )

    r = 4
    model, paths = apply_lora(base, AdapterConfig(r=r, dropout=0.0, target_modules="all-linear"))
    assert paths == targets.paths
    assert sorted(model.peft_config["default"].target_parameters) == _experts(arch)
    counted = count_parameters(model)
    assert counted.trainable == _attention_lora_params(r) + _shared_lora_params(
        arch, r
    ) + _expert_lora_params(r)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_expert_adapters_receive_gradients_change_and_load_with_plain_peft(checkpoints, arch, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from raylora.recipe import LoraRecipe

    config = FinetuneConfig(
        model=ModelConfig(name_or_path=checkpoints[arch], dtype="float32"),
        data=DataConfig(path="demo", max_length=128),
        adapter=AdapterConfig(r=4, alpha=8.0, dropout=0.0, target_modules="all-linear"),
        training=TrainingConfig(
            learning_rate=1e-3, max_steps=3, batch_size=2, warmup_steps=0, output_dir=str(tmp_path / "run")
        ),
    )
    recipe = LoraRecipe(config)
    recipe.setup()
    experts = {n: p for n, p in recipe.model.named_parameters() if p.requires_grad and ".experts." in n}
    assert len(experts) == 2 * 2 * LAYERS  # lora_A and lora_B for gate_up_proj and down_proj, per layer
    before = {n: p.detach().clone() for n, p in experts.items()}
    got_grad: set[str] = set()
    names = {id(p): n for n, p in experts.items()}

    def record(optimizer, args, kwargs):
        got_grad.update(
            names[id(p)] for p in experts.values() if p.grad is not None and p.grad.abs().sum() > 0
        )

    recipe.optimizer.register_step_pre_hook(record)
    for _ in range(3):
        recipe.step(recipe.next_batches())
    assert got_grad == set(experts), sorted(set(experts) - got_grad)
    assert all(not torch.equal(before[n], p.detach()) for n, p in experts.items())

    adapter = recipe.save_adapter(tmp_path / "adapter")
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert sum(".experts." in key for key in saved) == len(experts)
    loaded = PeftModel.from_pretrained(
        load_base_model(config.model, qlora=False), str(adapter)
    )  # plain peft, a fresh base
    ids = torch.arange(3, 19)[None]
    recipe.model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, recipe.model(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )


def test_explicit_names_reach_expert_weights_and_routers(checkpoints):
    base = load_base_model(ModelConfig(name_or_path=checkpoints["qwen2_moe"]), qlora=False)
    assert resolve_target_modules(base, ["experts.down_proj"]) == [
        p for p in _experts("qwen2_moe") if "down" in p
    ]
    # a router is adapted only when named
    assert resolve_target_modules(base, ["shared_expert_gate"]) == _linear(
        "qwen2_moe", ["mlp.shared_expert_gate"]
    )
    with pytest.raises(
        ConfigError, match=r"names experts\.up_proj, which match no linear layer.*gate_up_proj"
    ):
        resolve_target_modules(base, ["experts.up_proj"])


def test_experts_preset_on_a_dense_model_is_refused(tiny_llama_path):
    with pytest.raises(
        ConfigError, match=r"`adapter.target_modules` is 'experts', but this llama model has no routed"
    ):
        check_model(ModelConfig(), AdapterConfig(target_modules="experts"), max_length=64)


def test_settings_peft_cannot_apply_to_expert_weights_are_refused_before_loading(checkpoints):
    model = ModelConfig(name_or_path=checkpoints["mixtral"])
    adapter = AdapterConfig(target_modules="all-linear", dropout=0.05, use_dora=True)
    with pytest.raises(ConfigError, match="found 2 problems") as caught:
        check_model(model, adapter, max_length=64)
    assert caught.value.problems[0].startswith(
        "`adapter.dropout` is 0.05, but `adapter.target_modules` ('all-linear') adapts the routed experts"
    )
    assert caught.value.problems[1].startswith("`adapter.use_dora` is true")
    # without the experts the same settings are fine
    check_model(model, AdapterConfig(target_modules="attention", dropout=0.05, use_dora=True), max_length=64)


def test_qlora_quantises_the_experts_it_does_not_adapt(checkpoints):
    path = checkpoints["mixtral"]
    adapter = AdapterConfig(r=4, dropout=0.0, target_modules="attention", qlora=True)
    plan = plan_model(ModelConfig(name_or_path=path), adapter, max_length=64)
    assert plan.unquantized is not None and plan.unquantized.params == 0
    base = load_base_model(ModelConfig(name_or_path=path), qlora=True, adapter=adapter)
    quantized = [
        (name, p)
        for name, module in base.named_modules()
        if name.endswith("experts")
        for p, chain in module.parametrizations.items()
        if type(chain[0]).__name__ == "Bnb4bitParametrization"
    ]
    assert len(quantized) == 2 * LAYERS
    assert unquantized_weights(base).params == 0
    # counted by the weights they represent: the same total as the unquantised model
    bf16 = load_base_model(ModelConfig(name_or_path=path), qlora=False)
    assert count_parameters(base).total == count_parameters(bf16).total
    model, _ = apply_lora(base, adapter)
    model.train()
    ids = torch.arange(3, 19)[None]
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_qlora_says_which_adapted_experts_stay_bf16_and_what_they_cost(checkpoints):
    path = checkpoints["mixtral"]
    adapter = AdapterConfig(r=4, dropout=0.0, target_modules="all-linear", qlora=True)
    plan = plan_model(ModelConfig(name_or_path=path), adapter, max_length=64)
    expert_weights = LAYERS * EXPERTS * (2 * EXPERT_FFN * H + H * EXPERT_FFN)
    # With peft 0.21 a LoRA on a 4-bit expert weight would compound (measured, not assumed: see
    # raylora.model._peft_adapts_quantized_parameters); a peft that fixes it gets 4-bit experts here.
    from raylora.model import _peft_adapts_quantized_parameters

    if _peft_adapts_quantized_parameters():
        assert plan.unquantized.params == 0
        return
    assert plan.unquantized.params == expert_weights
    assert plan.unquantized.bytes == 2 * expert_weights  # bf16
    note = plan.unquantized.describe()
    assert f"{expert_weights:,} weights stay unquantised" in note and "mlp.experts.gate_up_proj" in note
    assert "cannot put LoRA on a bitsandbytes-quantised expert weight" in note
    assert plan.as_params()["unquantized_params"] == str(expert_weights)
    assert any(line.startswith("QLoRA: ") for line in plan.notes())
    # the loaded model measures the same
    assert unquantized_weights(
        load_base_model(ModelConfig(name_or_path=path), qlora=True, adapter=adapter)
    ) == (plan.unquantized)


def test_qwen2_moe_qlora_trains_and_evaluates_on_the_cpu(checkpoints, tmp_path):
    # bitsandbytes' CPU eval kernel once crashed on the 1-wide shared_expert_gate and the 32-wide expert MLPs.
    from raylora.recipe import LoraRecipe

    config = FinetuneConfig(
        model=ModelConfig(name_or_path=checkpoints["qwen2_moe"]),
        data=DataConfig(path="demo", max_length=128),
        adapter=AdapterConfig(r=4, dropout=0.0, target_modules="all-linear", qlora=True),
        training=TrainingConfig(
            max_steps=1, batch_size=2, warmup_steps=0, eval_batches=1, output_dir=str(tmp_path)
        ),
    )
    recipe = LoraRecipe(config)
    recipe.setup()
    assert torch.isfinite(torch.tensor(recipe.step(recipe.next_batches())["train_loss"]))
    assert torch.isfinite(torch.tensor(recipe.evaluate()))


def test_sharded_and_packed_trials_refuse_adapted_experts_with_the_reason(checkpoints, tmp_path):
    """Neither path builds LoRA on fused expert weights yet: each says so, and how to go on, instead of
    leaving the experts unadapted (sharded) or applying every packed adapter to every row (packed)."""
    from raylora.packed import PackedTrainer
    from raylora.shards import adapters_on_cpu, base_skeleton

    model = ModelConfig(name_or_path=checkpoints["mixtral"])
    experts = AdapterConfig(r=4, dropout=0.0, target_modules="all-linear")
    skeleton = base_skeleton(model, qlora=False)
    with (
        pytest.raises(ConfigError, match=r"adapts routed experts .*set `resources.workers=1`"),
        adapters_on_cpu(skeleton, experts),
    ):
        pass
    with adapters_on_cpu(skeleton, AdapterConfig(r=4, dropout=0.0, target_modules="attention")):
        pass  # attention alone builds on the meta base

    config = FinetuneConfig(
        model=model,
        data=DataConfig(path="demo", max_length=128),
        adapter=experts,
        training=TrainingConfig(
            max_steps=2, batch_size=2, warmup_steps=0, eval_batches=1, output_dir=str(tmp_path)
        ),
    )
    trainer = PackedTrainer(config)
    with pytest.raises(
        ConfigError, match=r"cannot join the pack: .*adapts routed experts.*`Sweep\(pack=False\)`"
    ):
        trainer.add("trial_a", config)


def test_a_sweep_that_adapts_experts_is_not_packed_and_a_pack_asked_for_is_refused_before_any_trial(
    checkpoints,
):
    """A pack routes LoRA rows per linear layer, not per expert weight: `pack="auto"` leaves such a sweep
    unpacked, and `pack=True` is refused from the skeleton, not by each trial when it joins its engine."""
    from ray import tune

    from raylora.sweep import Resources, Sweep
    from raylora.sweep.packing import auto_pack_reasons, pack_problems_of_sweep

    base = FinetuneConfig(
        model=ModelConfig(name_or_path=checkpoints["mixtral"]),
        data=DataConfig(path="demo", max_length=128),
        adapter=AdapterConfig(r=4, dropout=0.0, target_modules="attention"),
        training=TrainingConfig(max_steps=2, batch_size=2, warmup_steps=0, eval_batches=1),
    )
    sweep = Sweep(
        name="moe",
        base=base,
        scheduler="fifo",
        search_space={"adapter.target_modules": tune.choice(["attention", "all-linear"])},
        num_samples=2,
        resources=Resources(workers=1, cpus_per_worker=1, gpus_per_worker=1),
    ).validate()
    expected = (
        "`adapter.target_modules` 'all-linear' adapts routed experts (4 fused expert weights), which packed "
        "trials do not train; target 'attention' to leave the experts out"
    )
    assert auto_pack_reasons(sweep) == [expected]
    assert pack_problems_of_sweep(sweep) == [expected]
    sweep.search_space = {"adapter.r": tune.choice([4, 8])}
    assert auto_pack_reasons(sweep) == []  # attention alone packs
