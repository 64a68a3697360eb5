"""Tiny models built offline: the `tiny-llama` preset, and a small copy of any architecture's config.

`tiny-llama` is a 2-layer Llama-shaped model with a byte-level tokenizer. It exists so that everything (the
quickstart, the tests, CI) runs offline on a CPU in seconds, through the same `from_pretrained` path that
real checkpoints take: the preset is written once as an ordinary Hugging Face checkpoint directory (config,
safetensors weights, tokenizer files) and then loaded like any other local model. The weights are a seeded
random init, so every machine builds the same model.

The tokenizer maps each UTF-8 byte to one token (256 tokens) plus `<s>`, `</s>` and `<pad>`; it needs no
trained merges and no download, and it carries a small chat template so the `chat` data format works too.

`tiny_config` keeps an architecture's options (attention kind, position scheme, layer pattern, experts) and
cuts its sizes: 2 to 4 layers, width 64, 4 experts. `raylora.architecture` runs such a copy of the user's
checkpoint before any weight loads (is it causal? do packed documents stay apart?), and the breadth test
and `scripts/architectures.py` build one of every causal-LM type that transformers ships
(`tiny_checkpoint`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["TINY_PRESETS", "materialize_preset", "tiny_checkpoint", "tiny_config", "tiny_config_for_type"]

# Bump when the preset's shape, weights or tokenizer change, so stale caches are not reused.
_PRESET_VERSION = "1"

TINY_PRESETS: dict[str, dict[str, int]] = {
    "tiny-llama": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
    },
}

_SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]

# Llama-2-style chat markup, spelled in plain bytes so the byte-level tokenizer covers it.
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<<SYS>>{{ message['content'] }}<</SYS>>\n"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} {% endif %}"
)


def _cache_root() -> Path:
    root = os.environ.get("RAYLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "raylora")
    return Path(root) / "presets"


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    for token in _SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens(_SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=TINY_PRESETS["tiny-llama"]["max_position_embeddings"],
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def materialize_preset(name: str) -> str:
    """Write the preset `name` as a checkpoint directory (once) and return its path.

    Safe under concurrency: the checkpoint is built in a temporary directory and renamed into place, so
    several Ray trials starting at once never see a half-written preset.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in TINY_PRESETS:
        raise KeyError(name)
    target = _cache_root() / f"{name}-v{_PRESET_VERSION}"
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **TINY_PRESETS[name],
    )
    # Seeded init on a private generator: the same weights on every machine, without touching global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race only if the winner finished
                raise
        else:
            os.makedirs(tmp)  # TemporaryDirectory expects to clean up its own path
    return str(target)


# ---- a small copy of any architecture --------------------------------------------------------------------

# Size fields and the value a tiny copy gets (never more than the original: a top-k of 1 stays 1). Width 64
# with 4 heads of 16; the MLA dimensions of DeepSeek-style attention keep `head_dim == qk_rope_head_dim`.
_TINY_SIZES = {
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "embed_dim": 64,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "d_ff": 128, "ffn_hidden_size": 128,
    "decoder_ffn_dim": 128, "encoder_ffn_dim": 128, "dense_intermediate_size": 128, "intermediate_size_mlp": 128,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "n_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "num_key_value_heads": 2, "num_kv_heads": 2, "head_dim": 16, "kv_channels": 16,
    "rotary_dim": 8, "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16,
    "v_head_dim": 16, "qk_head_dim": 32, "index_head_dim": 16, "index_n_heads": 2,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "moe_k": 2, "n_group": 1, "topk_group": 1,
    "n_shared_experts": 1, "first_k_dense_replace": 1, "zero_expert_num": 1,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "moe_shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32, "shared_experts_intermediate_size": 32, "expert_ffn_hidden_size": 32,
    # state-space (Mamba) mixers: 8 heads of 16 make the expand-2 inner width of 128
    "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_num_heads": 8, "mamba_head_dim": 16, "mamba_headdim": 16,
    "mamba_d_ssm": 128, "mamba_d_state": 16, "ssm_state_size": 16, "state_size": 16, "mamba_chunk_size": 32,
    "mamba_dt_rank": 8, "time_step_rank": 8, "mamba_n_groups": 1, "n_groups": 1,
}  # fmt: skip
_LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers")
# The tiny tokenizer's ids (`_build_tokenizer`: 256 bytes, then <s>, </s>, <pad>) within a 320-token vocabulary.
_TINY_VOCAB = 320
_TINY_TOKEN_IDS = {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
# A tiny copy that still has more parameters than this is refused rather than built (a size field the
# shrinking does not know).
_TINY_MAX_PARAMETERS = 30_000_000


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shrink(d: dict[str, Any], sub_configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`d` (a config's `to_dict()`) with its sizes cut, its per-layer lists cut to the new depth."""
    original, d = d, dict(d)
    layers = next((d[k] for k in _LAYER_FIELDS if _is_int(d.get(k))), None)
    # Per-layer lists (`layer_types`, `mlp_layer_types`, a pattern string...): one entry per layer, repeating
    # a few kinds. The copy keeps one layer of each kind (up to 4 layers), in their original order.
    per_layer = {
        k: v
        for k, v in d.items()
        if layers and layers > 1 and isinstance(v, list | str) and len(v) == layers and k != "model_type"
        and len(set(map(str, v))) < len(v) and not (isinstance(v, str) and len(set(v)) > 4)
    }  # fmt: skip
    # Lists of layer indices (`full_attn_idxs`, `moe_layers`): kept where they fall inside the new depth.
    index_lists = {
        k: v
        for k, v in d.items()
        if layers and isinstance(v, list) and v and all(_is_int(i) for i in v) and len(set(v)) == len(v)
        and max(v) < layers and k not in per_layer
    }  # fmt: skip
    depth = 2
    if per_layer:
        kinds = max(len(set(map(str, v))) for v in per_layer.values())
        depth = min(layers, max(2, min(kinds, 4)))
    for key, target in _TINY_SIZES.items():
        if _is_int(d.get(key)):
            d[key] = min(d[key], target)
        elif key == "head_dim" and key in d and d[key] is None:
            d[key] = target
    for key in _LAYER_FIELDS:
        if _is_int(d.get(key)):
            d[key] = min(d[key], depth)
    if _is_int(original.get("num_key_value_heads")) and original.get("num_key_value_heads") == original.get(
        "num_attention_heads"
    ):
        d["num_key_value_heads"] = d["num_attention_heads"]  # no grouped-query attention stays none
    if _is_int(d.get("vocab_size")):
        d["vocab_size"] = _TINY_VOCAB
        d.update({k: v for k, v in _TINY_TOKEN_IDS.items() if _is_int(d.get(k))})
    for key, values in per_layer.items():
        first_of_kind: dict[str, int] = {}
        for index, value in enumerate(values):
            first_of_kind.setdefault(str(value), index)
        firsts = sorted(first_of_kind.values())
        picked = sorted((firsts + [i for i in range(layers) if i not in firsts])[:depth])
        chosen = [values[i] for i in picked]
        d[key] = "".join(chosen) if isinstance(values, str) else chosen
    for key, values in index_lists.items():
        d[key] = [i for i in values if i < depth]
    d.update(sub_configs)
    return d


def tiny_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of `config` with the same class and options and tiny sizes (width 64, 2-4 layers, 4 experts).

    Sub-configs (a multimodal model's text and vision configs) are cut the same way. The result may still
    be invalid for an architecture whose sizes are tied in ways this does not know; building it then
    raises, and callers treat that as "no tiny copy", never as a property of the architecture.
    """
    subs = {}
    for name in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            subs[name] = _shrink(sub.to_dict(), {})
    return type(config).from_dict(_shrink(config.to_dict(), subs))


def tiny_config_for_type(model_type: str) -> PretrainedConfig:
    """A tiny config of `model_type`, from its config class's defaults (no download).

    Tries `tiny_config` of the default config, then the class built directly with the tiny sizes (which
    lets the class derive what depends on them); the first whose model builds on the meta device within
    `_TINY_MAX_PARAMETERS` and runs a forward pass wins.

    Raises:
        RuntimeError: neither way gives a buildable tiny model; the message has both reasons.
    """
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]

    def by_keywords() -> PretrainedConfig:
        default = config_class()
        names = {f.name for f in dataclasses.fields(default)} if dataclasses.is_dataclass(default) else set()
        names |= set(getattr(default, "attribute_map", {}))
        kwargs = {
            k: min(getattr(default, k), v)
            for k, v in _TINY_SIZES.items()
            if k in names and _is_int(getattr(default, k, None))
        }
        kwargs.update({k: v for k, v in _TINY_TOKEN_IDS.items() if _is_int(getattr(default, k, None))})
        if "vocab_size" in names:
            kwargs["vocab_size"] = _TINY_VOCAB
        return config_class(**kwargs)

    reasons = []
    for make in (lambda: tiny_config(config_class()), by_keywords):
        try:
            config = make()
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(config)
            count = sum(p.numel() for p in skeleton.parameters())
            if count > _TINY_MAX_PARAMETERS:
                raise RuntimeError(f"the tiny copy still has {count:,} parameters")
            # It must also run: a size relation the shrinking broke shows up only in a forward pass.
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
                ids = torch.arange(2 * 48).remainder(250).reshape(2, 48) + 3
                mask = torch.ones_like(ids)
                mask[1, 40:] = 0  # a right-padded row, as the loop's batches have
                model.eval()(input_ids=ids, attention_mask=mask, use_cache=False)
            return config
        except Exception as error:  # any failure of a config class or model constructor: try the next way
            reasons.append(
                f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            )
    raise RuntimeError(f"no tiny {model_type} model could be built offline ({'; '.join(reasons)})")


def tiny_checkpoint(config: PretrainedConfig, directory: str | os.PathLike[str], *, seed: int = 0) -> str:
    """Write a random-init checkpoint of `config` (a tiny one) with the tiny byte-level tokenizer; its path.

    The model is built in fp32 from `seed` and saved with `save_pretrained`, so it loads back through the
    path real checkpoints take.
    """
    import torch
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    _build_tokenizer().save_pretrained(directory)
    return str(directory)
