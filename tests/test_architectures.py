"""Every causal LM that transformers ships trains through raylora, or is refused up front with the reason.

The breadth test enumerates transformers' own list of causal-LM types (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), so
it cannot be tuned to a list kept here. It builds each type tiny from its config class (offline) and runs it
through `raylora.survey.survey_architecture`: LoRA on `all-linear`, QLoRA, and packed LoRA, each of which must
train (finite loss, every adapter tensor gets a gradient, packed documents stay apart) or be refused with one
of the documented reasons (`raylora.survey.REFUSALS`, listed in docs/architectures.md).

Budget: the whole survey takes 20-25 minutes on two cores, so CI runs a deterministic sample of `_SAMPLE`
types, two at a time in worker processes: the types ordered by a hash of their name and the transformers
version, the first `_SAMPLE` of them. The sample is fixed for a given transformers release (reproducible failures) and moves
when transformers is upgraded (new types get their turn); nobody picks it. `RAYLORA_ARCHITECTURES=all` runs
every type (`scripts/architectures.py` does the same in parallel and writes the table).

The other tests pin what the issue that asked for this named: attention kernels per architecture, packing
refused where documents would mix, and the refusals (encoder-decoder, non-causal, unquantisable layers).
"""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
import torch

from raylora.config import AdapterConfig, ConfigError, DataConfig, FinetuneConfig, ModelConfig, TrainingConfig
from raylora.model import apply_lora, check_model, load_base_model, model_max_length, plan_model
from raylora.survey import causal_lm_types, survey_architecture, survey_in_worker

H, LAYERS, HEADS, VOCAB = 64, 2, 4, 320
# Types per CI run: each costs 10-15 CPU seconds (a tiny checkpoint, the pre-load checks, three short runs),
# so 24 take about 2.5 minutes on two cores, two at a time.
_SAMPLE = 16


def _sample() -> list[str]:
    import transformers

    types = causal_lm_types()
    if os.environ.get("RAYLORA_ARCHITECTURES") == "all":
        return types
    key = transformers.__version__
    return sorted(types, key=lambda t: hashlib.sha256(f"{key}:{t}".encode()).hexdigest())[:_SAMPLE]


@pytest.mark.timeout(1200)
def test_sampled_causal_lms_train_or_are_refused_with_a_documented_reason(tmp_path):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Two worker processes: each type costs 10-15 CPU seconds, mostly single-threaded.
    jobs = [(model_type, str(tmp_path / model_type)) for model_type in _sample()]
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        outcomes = list(pool.map(survey_in_worker, jobs))
    built = [o for o in outcomes if o.built]
    failures = [
        f"{o.model_type} {mode}: {result.detail}"
        for o in built
        for mode, result in o.modes.items()
        if result.status == "failed"
    ]
    undocumented = [
        f"{o.model_type} {mode}: {result.detail}"
        for o in built
        for mode, result in o.modes.items()
        if result.status == "refused" and result.refusal is None
    ]
    assert not failures, "\n".join(failures)
    assert not undocumented, "refused for a reason docs/architectures.md does not list:\n" + "\n".join(
        undocumented
    )
    # a type that cannot be built offline says why (its config class or model constructor failed)
    assert all(o.build_error.startswith(f"no tiny {o.model_type} model") for o in outcomes if not o.built)
    assert sum(o.modes["lora"].status == "trained" for o in built) >= len(built) // 2, (
        "most types should train"
    )


# ---- the architectures the issue named ------------------------------------------------------------------------


def _save(config, path) -> str:
    from transformers import AutoModelForCausalLM

    from raylora.tiny import _build_tokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    _build_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    from transformers import BloomConfig, FalconConfig, Gemma2Config, LlamaConfig, MptConfig

    root = tmp_path_factory.mktemp("architectures")
    ids = dict(bos_token_id=256, eos_token_id=257, pad_token_id=258)
    configs = {
        "gemma2": Gemma2Config(
            hidden_size=H,
            intermediate_size=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=2,
            head_dim=H // HEADS,
            vocab_size=VOCAB,
            **ids,
        ),
        "bloom": BloomConfig(hidden_size=H, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, **ids),
        "mpt": MptConfig(d_model=H, n_layers=LAYERS, n_heads=HEADS, vocab_size=VOCAB, max_seq_len=128, **ids),
        "falcon": FalconConfig(
            hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, vocab_size=VOCAB, **ids
        ),
        "llama": LlamaConfig(
            hidden_size=H,
            intermediate_size=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            vocab_size=VOCAB,
            **ids,
        ),
    }
    return {name: _save(config, root / name) for name, config in configs.items()}


@pytest.mark.parametrize("arch", ["gemma2", "bloom", "mpt"])
def test_gemma2_bloom_and_mpt_train_with_default_settings(checkpoints, arch):
    # The defaults: attention kernel `auto`, the `attention` preset, dropout 0.05.
    model = ModelConfig(name_or_path=checkpoints[arch], dtype="float32")
    adapter = AdapterConfig()
    plan = plan_model(model, adapter, max_length=64)
    base = load_base_model(model, qlora=False, adapter=adapter)
    assert base.config._attn_implementation == plan.attn_implementation
    peft_model, targets = apply_lora(base, adapter)
    assert targets and all("attn" in t or "attention" in t for t in targets)
    ids = torch.arange(3, 27)[None]
    peft_model.train()
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in peft_model.named_parameters()
        if "lora_B" in n
    )


def test_auto_attention_is_chosen_per_architecture_and_an_impossible_choice_is_refused(checkpoints):
    assert (
        plan_model(
            ModelConfig(name_or_path=checkpoints["llama"]), AdapterConfig(), max_length=64
        ).attn_implementation
        == "sdpa"
    )
    gemma2 = ModelConfig(name_or_path=checkpoints["gemma2"])
    plan = plan_model(gemma2, AdapterConfig(), max_length=64)
    assert plan.attn_implementation == "eager" and plan.notes()[0] == "attention: eager (auto)"
    gemma2.attn_implementation = "sdpa"
    with pytest.raises(
        ConfigError,
        match=r"`model.attn_implementation` is 'sdpa', which this gemma2 model cannot run \(transformers: "
        r"Gemma2ForCausalLM does not support .*scaled_dot_product_attention.*set it to 'auto' \(here: eager\)",
    ):
        check_model(gemma2, AdapterConfig(), max_length=64)


def test_attn_implementation_is_type_checked():
    for good in ("auto", None, "eager", "sdpa", "flash_attention_2", "kernels-community/flash-attn"):
        assert ModelConfig(attn_implementation=good).problems() == [], good
    for bad in ("spda", "", 3, "flash attention"):
        (problem,) = ModelConfig(attn_implementation=bad).problems()
        assert problem.startswith("`model.attn_implementation` must be one of auto, sdpa, eager"), bad
        assert repr(bad) in problem


@pytest.mark.parametrize("arch", ["bloom", "mpt"])
def test_packing_is_refused_where_packed_documents_see_each_other(checkpoints, arch, tmp_path):
    from raylora.training import validate_with_model

    config = FinetuneConfig(
        model=ModelConfig(name_or_path=checkpoints[arch]),
        data=DataConfig(path="demo", max_length=128, packing=True),
        training=TrainingConfig(output_dir=str(tmp_path)),
    )
    with pytest.raises(
        ConfigError,
        match=rf"`data.packing` is true, but this {arch} model lets packed documents see each other",
    ):
        validate_with_model(config)
    config.data.packing = False
    validate_with_model(config)


def test_a_sweep_with_packing_on_bloom_is_refused_before_any_trial(checkpoints, tmp_path):
    from ray import tune

    from raylora import Sweep

    base = FinetuneConfig(
        model=ModelConfig(name_or_path=checkpoints["bloom"]),
        data=DataConfig(path="demo", max_length=128),
        training=TrainingConfig(output_dir=str(tmp_path)),
    )
    sweep = Sweep(name="packing", base=base, search_space={"data.packing": tune.choice([False, True])})
    with pytest.raises(
        ConfigError, match=r"with data.packing=True: `data.packing` is true, but this bloom model"
    ):
        sweep.validate(against_model=True)


def test_mpt_length_limit_is_read_from_max_seq_len(checkpoints):
    from transformers import AutoConfig

    assert model_max_length(AutoConfig.from_pretrained(checkpoints["mpt"])) == 128
    with pytest.raises(ConfigError, match=r"`data.max_length` is 256, but this mpt model covers at most 128"):
        check_model(ModelConfig(name_or_path=checkpoints["mpt"]), AdapterConfig(), max_length=256)


def _config_only(path: str, tmp_path) -> str:
    shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
    return str(tmp_path)


def test_qlora_on_falcon_is_refused_before_any_weight_loads_with_the_true_reason(checkpoints, tmp_path):
    model = ModelConfig(name_or_path=_config_only(checkpoints["falcon"], tmp_path))  # no weights at all
    with pytest.raises(
        ConfigError,
        match=r"`adapter.qlora` is true, but no weight of .* \(falcon\) can be quantised to 4-bit: its class "
        r"FalconLinear subclasses torch.nn.Linear, and transformers' bitsandbytes integration converts only",
    ):
        check_model(model, AdapterConfig(qlora=True), max_length=64)
    check_model(model, AdapterConfig(qlora=False), max_length=64)  # LoRA on falcon is fine


def test_encoder_decoder_and_non_causal_models_are_refused(tmp_path):
    from transformers import BertConfig, T5Config, ViTConfig

    t5 = T5Config(d_model=H, d_ff=128, num_layers=LAYERS, num_heads=HEADS, vocab_size=VOCAB)
    t5.save_pretrained(tmp_path / "t5")
    with pytest.raises(
        ConfigError, match=r"a t5 model, which is an encoder-decoder model; raylora trains causal LMs"
    ):
        check_model(ModelConfig(name_or_path=str(tmp_path / "t5")), AdapterConfig(), max_length=64)

    ViTConfig(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS).save_pretrained(
        tmp_path / "vit"
    )
    with pytest.raises(ConfigError, match=r"a vit model, for which transformers has no causal-LM class"):
        check_model(ModelConfig(name_or_path=str(tmp_path / "vit")), AdapterConfig(), max_length=64)

    # BERT's LM head attends both ways unless the config says it is a decoder
    bert = BertConfig(
        hidden_size=H,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=128,
        vocab_size=VOCAB,
    )
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match=r"a bert model that is not causal: on a tiny random copy of it"):
        check_model(ModelConfig(name_or_path=str(tmp_path / "bert")), AdapterConfig(), max_length=64)
    bert.is_decoder = True
    bert.save_pretrained(tmp_path / "bert-decoder")
    check_model(ModelConfig(name_or_path=str(tmp_path / "bert-decoder")), AdapterConfig(), max_length=64)


# ---- what the survey found -------------------------------------------------------------------------------------


def _skeleton(model_type: str):
    from transformers import AutoModelForCausalLM

    from raylora.tiny import tiny_config_for_type

    config = tiny_config_for_type(model_type)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    ("model_type", "left_out", "why"),
    [
        # Jamba multiplies by dt_proj.weight itself; the mixer's CUDA kernel takes the weights of all three
        ("jamba", "model.layers.*.mamba.dt_proj", "hands its weight to a fused kernel or reads it directly"),
        # a sparse-attention indexer only feeds a top-k: called, but no gradient passes through it
        ("axk2", "model.layers.*.self_attn.indexer.wk", "no gradient reaches it on a tiny copy"),
        # RWKV rescales these two weights in place when it switches to eval mode
        ("rwkv", "rwkv.blocks.*.attention.output", "rewrites its weight in place"),
        # DeepSeek-V4's grouped output projection subclasses nn.Linear with a block-diagonal forward
        ("deepseek_v4", "model.layers.*.self_attn.o_a_proj", "whose forward is not x @ W.T + b"),
    ],
)
def test_presets_leave_out_layers_a_lora_would_not_reach(model_type, left_out, why):
    from raylora.targets import resolve_targets

    targets = resolve_targets(_skeleton(model_type), "all-linear")
    skipped = dict(targets.skipped)
    assert left_out in skipped and why in skipped[left_out], targets.skipped
    assert not any(path.replace(".0.", ".*.").replace(".1.", ".*.") == left_out for path in targets.modules)


def test_an_adapter_that_gets_no_gradient_is_refused_at_the_first_step(tmp_path):
    # Named explicitly, Jamba's dt_proj is adapted, and its LoRA never runs: the loop says so at once.
    from raylora.recipe import LoraRecipe
    from raylora.tiny import tiny_checkpoint, tiny_config_for_type

    path = tiny_checkpoint(tiny_config_for_type("jamba"), tmp_path / "jamba")
    config = FinetuneConfig(
        model=ModelConfig(name_or_path=path, dtype="float32"),
        data=DataConfig(path="demo", max_length=128),
        adapter=AdapterConfig(r=2, dropout=0.0, target_modules=["in_proj", "dt_proj"]),
        training=TrainingConfig(max_steps=2, batch_size=2, warmup_steps=0, output_dir=str(tmp_path / "run")),
    )
    recipe = LoraRecipe(config)
    recipe.setup()
    with pytest.raises(
        ConfigError, match=r"adapter tensors got no gradient in the first step \(.*dt_proj\.lora_A"
    ):
        recipe.step(recipe.next_batches())


def test_packing_stays_apart_on_a_multimodal_wrapper_through_the_loop(tmp_path):
    # Fuyu's language model reads text_config.use_cache: with a cache on, transformers skips the packed mask.
    outcome = survey_architecture("fuyu", tmp_path, modes=("packing",))
    assert outcome.modes["packing"].status == "trained", outcome.modes["packing"].detail
    base = load_base_model(ModelConfig(name_or_path=str(tmp_path / "checkpoint")), qlora=False)
    assert base.config.get_text_config().use_cache is False


@pytest.mark.parametrize("model_type", ["ctrl", "git"])
def test_qlora_without_activation_checkpointing_where_the_architecture_cannot(model_type, tmp_path):
    # CTRL declares no checkpointing; GIT declares it, and a checkpointed step fails (its embedding adds the
    # position embeddings in place to an output that checkpointing made require grad): measured on a tiny copy.
    from raylora.tiny import tiny_checkpoint, tiny_config_for_type
    from raylora.training import validate_with_model

    outcome = survey_architecture(model_type, tmp_path / "survey", modes=("qlora",))
    assert outcome.modes["qlora"].status == "trained", outcome.modes["qlora"].detail
    path = tiny_checkpoint(tiny_config_for_type(model_type), tmp_path / model_type)
    config = FinetuneConfig(
        model=ModelConfig(name_or_path=path),
        data=DataConfig(path="demo", max_length=128),
        adapter=AdapterConfig(qlora=True),
        training=TrainingConfig(activation_checkpointing=True, output_dir=str(tmp_path / "run")),
    )
    plan = validate_with_model(FinetuneConfig(model=config.model, data=config.data, adapter=config.adapter))
    assert f"activation checkpointing: {model_type} cannot run with it" in " ".join(plan.notes())
    with pytest.raises(
        ConfigError, match=rf"`training.activation_checkpointing` is True, but this {model_type} model cannot"
    ):
        validate_with_model(config)
