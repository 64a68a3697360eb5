"""The built-in `tiny-llama` preset: a 2-layer Llama-shaped model with a byte-level tokenizer.

It exists so that everything (the quickstart, the tests, CI) runs offline on a CPU in seconds, through the
same `from_pretrained` path that real checkpoints take: the preset is written once as an ordinary
Hugging Face checkpoint directory (config, safetensors weights, tokenizer files) and then loaded like any
other local model. The weights are a seeded random init, so every machine builds the same model.

The tokenizer maps each UTF-8 byte to one token (256 tokens) plus `<s>`, `</s>` and `<pad>`; it needs no
trained merges and no download, and it carries a small chat template so the `chat` data format works too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["TINY_PRESETS", "materialize_preset"]

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
