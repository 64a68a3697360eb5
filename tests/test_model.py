"""raylora.model on tiny real checkpoints: presets per architecture, LoRA injection, parameter counts, errors.

Every model is built from a config, saved with `save_pretrained` and loaded back through `load_base_model`,
the path real checkpoints take. Expected module paths and parameter counts are written out from the
architectures' dimensions here, not derived from the code under test.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from raylora.config import AdapterConfig, ConfigError, ModelConfig
from raylora.model import (
    apply_lora,
    check_max_length,
    check_model,
    count_parameters,
    load_base_model,
    load_tokenizer,
    model_max_length,
)
from raylora.targets import PRESET_NAMES, linear_layer_names, resolve_target_modules

H, FFN, LAYERS, HEADS, KV_HEADS, VOCAB, POSITIONS = 64, 128, 2, 4, 2, 128, 256
KV = H // HEADS * KV_HEADS  # width of the k and v projections under grouped-query attention


def _configs():
    from transformers import (
        GemmaConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Phi3Config,
        PhiConfig,
        Qwen2Config,
        Qwen3Config,
    )

    decoder = dict(hidden_size=H, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
    gqa = dict(decoder, num_key_value_heads=KV_HEADS)
    return {
        "llama": LlamaConfig(
            **gqa, vocab_size=VOCAB, max_position_embeddings=POSITIONS, tie_word_embeddings=False
        ),
        "mistral": MistralConfig(**gqa, vocab_size=VOCAB, max_position_embeddings=POSITIONS),
        "qwen2": Qwen2Config(**gqa, vocab_size=VOCAB, max_position_embeddings=POSITIONS),
        "gpt2": GPT2Config(
            n_embd=H,
            n_layer=LAYERS,
            n_head=HEADS,
            vocab_size=VOCAB,
            n_positions=POSITIONS,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "opt": OPTConfig(
            hidden_size=H,
            ffn_dim=FFN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            vocab_size=VOCAB,
            word_embed_proj_dim=H,
            max_position_embeddings=POSITIONS,
        ),
        "gpt_neox": GPTNeoXConfig(**decoder, vocab_size=VOCAB, max_position_embeddings=POSITIONS),
        "phi": PhiConfig(**decoder, vocab_size=VOCAB, max_position_embeddings=POSITIONS),
        "qwen3": Qwen3Config(**gqa, head_dim=H // HEADS, vocab_size=VOCAB, max_position_embeddings=POSITIONS),
        "phi3": Phi3Config(**gqa, vocab_size=VOCAB, max_position_embeddings=POSITIONS, pad_token_id=0),
        "gemma": GemmaConfig(**gqa, head_dim=H // HEADS, vocab_size=VOCAB, max_position_embeddings=POSITIONS),
    }


# Per architecture: the decoder-layer container and the attention / MLP linear layers inside one layer, as
# the Hugging Face implementations name them (printed from `named_modules()` of each model).
EXPECTED = {
    "llama": (
        "model.layers",
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    ),
    "mistral": (
        "model.layers",
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    ),
    "qwen2": (
        "model.layers",
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    ),
    "gpt2": ("transformer.h", ["attn.c_attn", "attn.c_proj"], ["mlp.c_fc", "mlp.c_proj"]),
    "opt": (
        "model.decoder.layers",
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"],
        ["fc1", "fc2"],
    ),
    "gpt_neox": (
        "gpt_neox.layers",
        ["attention.query_key_value", "attention.dense"],
        ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    ),
    "phi": (
        "model.layers",
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"],
        ["mlp.fc1", "mlp.fc2"],
    ),
    "qwen3": (
        "model.layers",
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    ),
    "phi3": (
        "model.layers",
        ["self_attn.qkv_proj", "self_attn.o_proj"],
        ["mlp.gate_up_proj", "mlp.down_proj"],
    ),
    "gemma": (
        "model.layers",
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    ),
}


def _paths(arch: str, which: str) -> list[str]:
    prefix, attention, mlp = EXPECTED[arch]
    names = {"attention": attention, "mlp": mlp, "all-linear": attention + mlp}[which]
    return sorted(f"{prefix}.{i}.{name}" for i in range(LAYERS) for name in names)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """One saved tiny checkpoint per architecture (seeded random weights)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for arch, config in _configs().items():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(root / arch)
        paths[arch] = str(root / arch)
    return paths


def _model(path: str, **kwargs) -> ModelConfig:
    return ModelConfig(name_or_path=path, **kwargs)


def _backward(model) -> None:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()


# --------------------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_presets_resolve_to_the_architectures_own_layers(checkpoints, arch):
    base = load_base_model(_model(checkpoints[arch]), qlora=False)
    assert base.config.model_type == arch
    assert model_max_length(base.config) == POSITIONS

    for preset in PRESET_NAMES:
        assert resolve_target_modules(base, preset) == _paths(arch, preset), preset
    assert not any("lm_head" in p for p in resolve_target_modules(base, "all-linear"))
    assert "lm_head" not in linear_layer_names(base)

    model, targets = apply_lora(base, AdapterConfig(r=2, target_modules="attention"))
    assert targets == _paths(arch, "attention")
    assert sorted(model.base_model.targeted_module_names) == targets  # peft wrapped exactly these
    _backward(model)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == len(targets) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_gpt2_attention_preset_does_not_take_the_mlp_c_proj(checkpoints):
    # GPT-2 names both its attention output and its MLP output `c_proj`: a leaf-name preset would wrap both.
    base = load_base_model(_model(checkpoints["gpt2"]), qlora=False)
    attention = resolve_target_modules(base, "attention")
    assert "transformer.h.0.attn.c_attn" in attention and "transformer.h.0.attn.c_proj" in attention
    assert "transformer.h.0.mlp.c_proj" not in attention
    assert "transformer.h.1.mlp.c_proj" in resolve_target_modules(base, "mlp")
    # an explicit name is a suffix on module boundaries: `attn.c_proj` alone, `c_proj` both
    assert resolve_target_modules(base, ["attn.c_proj"]) == [
        "transformer.h.0.attn.c_proj",
        "transformer.h.1.attn.c_proj",
    ]
    assert len(resolve_target_modules(base, ["c_proj"])) == 2 * LAYERS


def test_presets_come_from_module_names_on_an_architecture_outside_any_table():
    # BLOOM is in no table: its `attention` and `mlp` presets come from the module names (self_attention.*,
    # mlp.*), as on every causal LM (tests/test_architectures.py covers them all).
    from transformers import AutoModelForCausalLM, BloomConfig

    model = AutoModelForCausalLM.from_config(
        BloomConfig(hidden_size=H, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB)
    )
    assert linear_layer_names(model) == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
    assert len(resolve_target_modules(model, "all-linear")) == 4 * LAYERS  # no lm_head
    assert resolve_target_modules(model, "attention") == sorted(
        f"transformer.h.{i}.self_attention.{name}"
        for i in range(LAYERS)
        for name in ("dense", "query_key_value")
    )
    assert resolve_target_modules(model, "mlp") == sorted(
        f"transformer.h.{i}.mlp.{name}" for i in range(LAYERS) for name in ("dense_4h_to_h", "dense_h_to_4h")
    )


def test_attention_preset_without_attention_lists_the_linear_layers():
    # Mamba has no attention block: `attention` is refused with the model's linear layers to choose from.
    from transformers import AutoModelForCausalLM, MambaConfig

    model = AutoModelForCausalLM.from_config(
        MambaConfig(hidden_size=H, num_hidden_layers=LAYERS, vocab_size=VOCAB, state_size=4)
    )
    with pytest.raises(
        ConfigError,
        match=r"`adapter.target_modules` is 'attention', but no attention projection of this mamba model can "
        r"be recognised.*its linear layers are: dt_proj, in_proj, out_proj, x_proj",
    ):
        resolve_target_modules(model, "attention")
    # Mamba's mixer hands x_proj, dt_proj and out_proj to its fused CUDA kernel as weights (the CPU path also
    # reads dt_proj.weight directly): a LoRA there would be skipped, so all-linear leaves them out, by name.
    from raylora.targets import resolve_targets

    targets = resolve_targets(model, "all-linear")
    assert targets.modules == tuple(f"backbone.layers.{i}.mixer.in_proj" for i in range(LAYERS))
    assert [pattern for pattern, _ in targets.skipped] == [
        f"backbone.layers.*.mixer.{name}" for name in ("dt_proj", "out_proj", "x_proj")
    ]


# --------------------------------------------------------------------------------------------------------
# Loading


def test_base_is_frozen_in_the_asked_dtype_and_cache_off(checkpoints):
    base = load_base_model(_model(checkpoints["llama"]), qlora=False, device="cpu")
    assert all(not p.requires_grad for p in base.parameters())
    assert {p.dtype for p in base.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in base.parameters()} == {"cpu"}
    assert base.config.use_cache is False
    fp32 = load_base_model(_model(checkpoints["llama"], dtype="float32"), qlora=False)
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}


def test_tokenizer_pads_right_with_eos_when_it_has_no_pad_token(tiny_llama_path, tmp_path):
    tokenizer = load_tokenizer(_model("tiny-llama"))
    assert tokenizer.pad_token == "<pad>" and tokenizer.padding_side == "right"

    from transformers import AutoTokenizer

    no_pad = AutoTokenizer.from_pretrained(tiny_llama_path)
    no_pad.pad_token = None
    no_pad.padding_side = "left"
    no_pad.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(_model(str(tmp_path)))
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>" and tokenizer.padding_side == "right"


# --------------------------------------------------------------------------------------------------------
# Parameter counts, computed by hand from the tiny Llama's dimensions


def _llama_base_params() -> int:
    attention = H * H + KV * H + KV * H + H * H  # q, k, v, o; no biases
    mlp = 3 * H * FFN  # gate, up, down
    norms = 2 * H
    return 2 * VOCAB * H + LAYERS * (attention + mlp + norms) + H  # embed + untied head + layers + final norm


def _llama_lora_params(r: int) -> int:
    # r * (d_in + d_out) per wrapped linear, for all-linear
    per_layer = (H + H) + (H + KV) + (H + KV) + (H + H) + 2 * (H + FFN) + (FFN + H)
    return LAYERS * r * per_layer


@pytest.mark.parametrize("qlora", [False, True], ids=["bf16", "qlora"])
def test_parameter_counts_match_a_hand_count(checkpoints, qlora):
    import bitsandbytes as bnb

    base = load_base_model(_model(checkpoints["llama"]), qlora=qlora)
    quantized = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == (7 * LAYERS if qlora else 0)
    if qlora:  # packed storage: two 4-bit values per byte, so four per bf16 element
        q_proj = base.model.layers[0].self_attn.q_proj.weight
        assert q_proj.dtype == torch.bfloat16 and q_proj.numel() == H * H // 4
    assert count_parameters(base).total == _llama_base_params()
    assert count_parameters(base).trainable == 0

    r = 4
    model, _ = apply_lora(base, AdapterConfig(r=r, target_modules="all-linear"))
    counted = count_parameters(model)
    assert counted.trainable == _llama_lora_params(r)
    assert counted.total == _llama_base_params() + _llama_lora_params(r)
    assert counted.trainable_percent == pytest.approx(100 * counted.trainable / counted.total)
    # adapters train in fp32; the unquantised rest of the base stays bf16 (no fp32 upcast for QLoRA)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert model.base_model.model.lm_head.weight.dtype == torch.bfloat16


def test_tied_embeddings_count_once(checkpoints):
    base = load_base_model(_model(checkpoints["gpt2"]), qlora=False)
    assert base.lm_head.weight is base.transformer.wte.weight
    per_layer = 2 * H + (H * 3 * H + 3 * H) + (H * H + H) + 2 * H + (H * 4 * H + 4 * H) + (4 * H * H + H)
    expected = VOCAB * H + POSITIONS * H + LAYERS * per_layer + 2 * H  # wte (= lm_head), wpe, blocks, ln_f
    assert count_parameters(base).total == expected


def _count_sharded(rank: int, world: int, port: int, path: str, results) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        counts = []
        for qlora in (False, True):
            model, _ = apply_lora(
                load_base_model(_model(path), qlora=qlora), AdapterConfig(r=4, target_modules="all-linear")
            )
            before = count_parameters(model)
            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            sharded = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
            counts.append(
                (before, count_parameters(model), type(sharded).__name__, tuple(sharded.to_local().shape))
            )
        results.put((rank, counts))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)  # two gloo ranks: a hung collective should fail the test, not the session
def test_sharded_parameters_count_their_global_shape(checkpoints):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(
        _count_sharded, args=(2, port, checkpoints["llama"], results), nprocs=2, start_method="spawn"
    )
    expected_total = _llama_base_params() + _llama_lora_params(4)
    for _ in range(2):
        rank, counts = results.get()
        for before, after, kind, local_shape in counts:  # bf16, then 4-bit
            assert kind == "DTensor" and local_shape == (2, H)  # each rank holds half of lora_A (4 x 64)
            assert before.total == after.total == expected_total, rank
            assert before.trainable == after.trainable == _llama_lora_params(4), rank


# --------------------------------------------------------------------------------------------------------
# Adapter switches


@pytest.mark.parametrize("qlora", [False, True], ids=["bf16", "qlora"])
def test_dora_and_rslora_reach_peft(checkpoints, qlora):
    r, alpha = 4, 8.0
    base = load_base_model(_model(checkpoints["llama"]), qlora=qlora)
    adapter = AdapterConfig(
        r=r, alpha=alpha, target_modules=["q_proj", "v_proj"], use_dora=True, use_rslora=True
    )
    model, targets = apply_lora(base, adapter)
    config = model.peft_config["default"]
    assert config.use_dora and config.use_rslora and config.r == r and config.lora_alpha == alpha
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(alpha / math.sqrt(r))  # rsLoRA: alpha / sqrt(r)
    magnitudes = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == len(targets) == 2 * LAYERS
    assert all(p.requires_grad for p in magnitudes.values())
    # DoRA adds one magnitude per output feature of each wrapped layer
    lora = LAYERS * r * ((H + H) + (H + KV))
    assert count_parameters(model).trainable == lora + LAYERS * (H + KV)
    _backward(model)
    assert all(p.grad is not None for p in magnitudes.values())


def test_modules_to_save_trains_the_head_in_full(checkpoints):
    base = load_base_model(_model(checkpoints["llama"]), qlora=False)
    model, _ = apply_lora(base, AdapterConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "lm_head" in n]
    assert trainable == ["base_model.model.lm_head.modules_to_save.default.weight"]
    counted = count_parameters(model)
    assert counted.trainable == _llama_lora_params(4) + VOCAB * H
    assert counted.total == _llama_base_params() + _llama_lora_params(4) + VOCAB * H  # the trained copy


def test_activation_checkpointing_still_reaches_every_adapter(checkpoints):
    base = load_base_model(_model(checkpoints["llama"]), qlora=True)
    model, _ = apply_lora(
        base, AdapterConfig(r=4, target_modules="all-linear"), activation_checkpointing=True
    )
    assert model.base_model.model.model.gradient_checkpointing
    _backward(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is not None for p in trainable.values())
    assert all(p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)


def test_checkpointing_a_fraction_of_the_layers_spreads_them_evenly(checkpoints):
    from transformers.modeling_layers import GradientCheckpointingLayer

    for fraction, expected in ((0.5, [False, True]), (1.0, [True, True]), (0.4, [False, False])):
        base = load_base_model(_model(checkpoints["llama"]), qlora=False)
        model, _ = apply_lora(
            base, AdapterConfig(r=4, target_modules="all-linear"), activation_checkpointing=fraction
        )
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert [layer.gradient_checkpointing for layer in layers] == expected, fraction
        # Checkpointed or not, every adapter gets its gradient.
        _backward(model)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------------------
# Bad input


def test_missing_local_path_is_a_config_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(
        ConfigError,
        match=r"`model.name_or_path` is '.*no-such-model', which looks like a local path but does not exist",
    ):
        load_base_model(_model(missing), qlora=False)
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(
        ConfigError, match=r"`model.name_or_path` .* is a file; give the checkpoint directory"
    ):
        load_tokenizer(_model(str(tmp_path / "weights.safetensors")))
    with pytest.raises(ConfigError, match=r"`model.name_or_path` is '.*', whose config could not be loaded"):
        load_base_model(_model(str(tmp_path)), qlora=False)  # a directory without config.json


def test_unreachable_hub_id_is_a_config_error():
    # conftest sets HF_HUB_OFFLINE=1: the hub is never reached, as on a machine without network.
    with pytest.raises(
        ConfigError, match=r"`model.name_or_path` is 'no-org/no-such-model', whose config could not be"
    ):
        load_base_model(_model("no-org/no-such-model"), qlora=False)


def test_target_module_errors_name_every_bad_name(checkpoints):
    base = load_base_model(_model(checkpoints["llama"]), qlora=False)
    with pytest.raises(
        ConfigError,
        match=r"`adapter.target_modules` names q_porj, which match no linear layer of "
        r"this llama model.*its linear layers are: down_proj, gate_proj, k_proj, o_proj, q_proj",
    ):
        apply_lora(base, AdapterConfig(target_modules=["q_proj", "q_porj"]))
    with pytest.raises(ConfigError, match=r"names q_porj, v_porj, which match no"):
        resolve_target_modules(base, ["q_porj", "k_proj", "v_porj"])
    with pytest.raises(
        ConfigError,
        match=r"`adapter.target_modules` is 'atention', which is neither a preset "
        r"\(attention, mlp, all-linear\)",
    ):
        resolve_target_modules(base, "atention")
    with pytest.raises(
        ConfigError, match=r"`adapter.modules_to_save` names lm_haed, which match no module.*lm_head"
    ):
        apply_lora(base, AdapterConfig(target_modules="attention", modules_to_save=["lm_haed"]))
    assert not any("lora" in n for n, _ in base.named_parameters())  # refused before any injection


def test_qlora_on_an_already_quantised_checkpoint_is_a_config_error(checkpoints, tmp_path):
    # A GPTQ checkpoint carries its quantization_config in config.json: NF4 cannot be applied on top.
    gptq = tmp_path / "gptq"
    shutil.copytree(checkpoints["llama"], gptq)
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}
    (gptq / "config.json").write_text(json.dumps(config))
    expected = r"`adapter.qlora` is true, but the checkpoint .* is already quantised with gptq.*unquantised"
    with pytest.raises(ConfigError, match=expected):
        load_base_model(_model(str(gptq)), qlora=True)
    with pytest.raises(ConfigError, match=expected):
        check_model(_model(str(gptq)), AdapterConfig(qlora=True), max_length=64)


def test_a_bitsandbytes_4bit_checkpoint_loads_as_is_for_qlora(checkpoints, tmp_path):
    load_base_model(_model(checkpoints["llama"]), qlora=True).save_pretrained(tmp_path)
    assert (
        json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"]
        == "bitsandbytes"
    )
    base = load_base_model(_model(str(tmp_path)), qlora=True)
    assert count_parameters(base).total == _llama_base_params()
    # without QLoRA it would still load 4-bit, and the run's logged config would say otherwise
    with pytest.raises(ConfigError, match=r"`adapter.qlora` is false, but the checkpoint .* is stored in "):
        load_base_model(_model(str(tmp_path)), qlora=False)


def test_max_length_beyond_the_model_is_a_config_error(checkpoints):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoints["gpt2"])
    check_max_length(config, POSITIONS)
    with pytest.raises(
        ConfigError,
        match=rf"`data.max_length` is 4096, but this gpt2 model covers at most {POSITIONS} "
        rf"positions; set `data.max_length` to {POSITIONS} or less",
    ):
        check_max_length(config, 4096)


def test_check_model_reports_every_problem_before_loading_weights(checkpoints, tmp_path):
    # config.json alone is enough: the architecture is built on the meta device.
    shutil.copy(os.path.join(checkpoints["llama"], "config.json"), tmp_path / "config.json")
    model = _model(str(tmp_path))
    assert check_model(model, AdapterConfig(target_modules="mlp"), max_length=POSITIONS) == _paths(
        "llama", "mlp"
    )
    bad = AdapterConfig(target_modules=["q_proj", "q_porj"], modules_to_save=["lmhead"])
    with pytest.raises(ConfigError, match=r"found 3 problems") as caught:
        check_model(model, bad, max_length=POSITIONS + 1)
    assert [p.split(" ")[0] for p in caught.value.problems] == [
        "`data.max_length`",
        "`adapter.target_modules`",
        "`adapter.modules_to_save`",
    ]
