"""Training data: records from a file, a directory, the hub or the packaged demo, turned into token sequences.

One way through: read the records → render each by `data.format` into token ids and a loss mask → truncate
to `data.max_length` → split train/eval by record → pack (optional) → `TokenizedData`. The loop then draws
tensors from `iterate_batches` (infinite, seeded, resumable) and `eval_batches` (one ordered pass).

Choices that shape the numbers:

- Labels are the input ids with -100 (`IGNORE_INDEX`) where the loss is masked; the loop shifts them by one.
  The first token of every document is always masked: nothing precedes it, so it is never a target. This
  keeps the count of trained tokens the same whether documents sit alone in a row or packed together
  (otherwise, packed, the first token would be "predicted" from the previous document's last one).
- Text and instruction examples are tokenized without the tokenizer's own special tokens and framed
  explicitly: bos (when the tokenizer has one) + text + eos. Chat examples take what the chat template
  renders, plus a bos in front if the template did not write one.
- A record that cannot become a trainable example is an error, never skipped: missing or mistyped fields,
  empty text, or nothing left to train after truncation. Up to ten of them (`raylora.sources.capped`) are reported in one
  `ConfigError`, each naming the file, the record number and the field.
- The eval split is drawn by record before packing, so an eval document never shares a row with a training
  document.
- Packed rows are exactly `data.max_length` tokens (the last one topped up with an untrained filler
  segment), so packed batches need no padding and no attention mask: see `_pack` and `iterate_batches`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from raylora.config import ConfigError, DataConfig
from raylora.sources import SUPPORTED_EXTENSIONS, RecordProblem, Source, capped, read_eval_source, read_source

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_TEMPLATE",
    "PROMPT_TEMPLATE_WITH_INPUT",
    "SUPPORTED_EXTENSIONS",
    "DataSummary",
    "Example",
    "TokenizedData",
    "data_fingerprint",
    "eval_batches",
    "instruction_prompt",
    "iterate_batches",
    "load_data",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# The instruction format's prompt (Alpaca's section headers without its preamble sentence, which would cost
# ~90 tokens per example on a byte-level tokenizer). The model is trained on the response and eos only;
# use `instruction_prompt` to build the same prompt at inference time.
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

# Bump when the rendering of records into tokens changes, so that old fingerprints stop matching.
_RENDERING_VERSION = "1"


@dataclass
class Example:
    """One training row: token ids, their labels (-100 where masked) and per-document position ids.

    A packed row holds several documents; `position_ids` restarts at 0 at each document boundary.
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataSummary:
    """What `load_data` produced, in plain numbers for logs and MLflow params.

    `fingerprint` is a sha256 over the source bytes (or, for a hub dataset, its id, split and `datasets`
    fingerprint) and the `DataConfig` fields that change how records become tokens. It identifies the data
    and its tokenisation, not the train/eval split (that follows `data.split_seed` and `data.eval_fraction`,
    which are logged with the config) nor the tokenizer (which follows the model).
    """

    source: str  # "demo (demo.jsonl)", the path as given, or "owner/name[split]"
    format: str
    train_records: int  # records read into each split
    eval_records: int
    train_examples: int  # rows: one per record, or fewer when packed
    eval_examples: int
    truncated: int  # records (both splits) cut to `max_length`; also logged as a warning
    train_tokens: int  # input tokens in the rows, including packing's repeated context and filler
    train_trained_tokens: int  # labels that are not -100: the loss targets of one epoch
    eval_tokens: int
    eval_trained_tokens: int
    packing: bool
    max_length: int
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TokenizedData:
    """The train and eval examples, ready for `iterate_batches` / `eval_batches`, and their summary."""

    train: list[Example]
    eval: list[Example]
    summary: DataSummary


def instruction_prompt(instruction: str, input: str | None = None) -> str:
    """The prompt of the `instruction` format: what the model sees before the response it is trained on."""
    if input:
        return PROMPT_TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_TEMPLATE.format(instruction=instruction)


def load_data(data: DataConfig, tokenizer: Any, *, seed: int) -> TokenizedData:
    """Read, render, tokenize, split and (optionally) pack the dataset that `data` describes.

    Args:
        data: the data section of the config.
        tokenizer: the model's tokenizer (a fast tokenizer; the `chat` format needs its chat template).
        seed: the run's `training.seed`: it seeds the packing order of the train rows. The eval hold-out
            (when `data.eval_path` is None) follows `data.split_seed` alone, so runs with different training
            seeds are evaluated on the same records.

    Returns:
        The train and eval examples and a `DataSummary`.

    Raises:
        ConfigError: a bad `data` field, a missing or unreadable source, malformed records (up to ten listed
            together, each with its file, record number and field), an empty dataset, or a split that would
            leave train or eval empty.
    """
    problems = data.problems()
    if problems:
        raise ConfigError(problems)
    if data.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "`data.format` is 'chat', but the tokenizer has no chat template to render messages with; use a "
            "model whose tokenizer defines one, or format `instruction` or `text`"
        )
    if data.format == "chat" and not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            "`data.format` is 'chat', which needs a fast tokenizer (for character offsets) to find the "
            "assistant turns; load the model's fast tokenizer, or use format `instruction`"
        )

    train_source = read_source(data)
    eval_source = read_eval_source(data, hub=train_source.hub) if data.eval_path is not None else None
    for source, name in ((train_source, "data.path"), (eval_source, "data.eval_path")):
        if source is not None and not source.records:
            raise ConfigError(
                f"`{name}` is {getattr(data, name.split('.')[1])!r}, which holds no records "
                f"({source.label}); point it at a non-empty dataset"
            )

    render = _RENDERERS[data.format]
    problems, truncated = [], 0
    documents: dict[str, list[Example]] = {"train": [], "eval": []}
    for split, source in (("train", train_source), ("eval", eval_source)):
        for record in source.records if source is not None else []:
            try:
                ids, trained = render(record.value, record.where, data, tokenizer)
                example, was_truncated = _to_example(ids, trained, record.where, data.max_length)
            except RecordProblem as problem:
                problems.append(str(problem))
                continue
            truncated += was_truncated
            documents[split].append(example)
    if problems:
        raise ConfigError(capped(problems))

    train_docs, eval_docs = documents["train"], documents["eval"]
    if eval_source is None:
        train_docs, eval_docs = _hold_out(train_docs, data.eval_fraction, data.split_seed)
    if truncated:
        logger.warning(
            "%d of %d examples were longer than `data.max_length` = %d tokens and were truncated",
            truncated,
            len(train_docs) + len(eval_docs),
            data.max_length,
        )
    n_train_records, n_eval_records = len(train_docs), len(eval_docs)
    if data.packing:
        filler = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        train_docs = _pack(train_docs, data.max_length, filler, order_seed=_derive_seed(seed, "pack"))
        eval_docs = _pack(eval_docs, data.max_length, filler, order_seed=None)  # eval keeps the file order

    summary = DataSummary(
        source=train_source.label,
        format=data.format,
        train_records=n_train_records,
        eval_records=n_eval_records,
        train_examples=len(train_docs),
        eval_examples=len(eval_docs),
        truncated=truncated,
        train_tokens=sum(len(e) for e in train_docs),
        train_trained_tokens=_trained_tokens(train_docs),
        eval_tokens=sum(len(e) for e in eval_docs),
        eval_trained_tokens=_trained_tokens(eval_docs),
        packing=data.packing,
        max_length=data.max_length,
        fingerprint=_fingerprint(data, train_source, eval_source),
    )
    return TokenizedData(train=train_docs, eval=eval_docs, summary=summary)


def data_fingerprint(data: DataConfig) -> str:
    """The dataset fingerprint `load_data` puts in its summary, without a tokenizer: reads the sources only.

    The sweep driver logs it on the parent run, so two sweeps on the same bytes and rendering match.
    """
    train_source = read_source(data)
    eval_source = read_eval_source(data, hub=train_source.hub) if data.eval_path is not None else None
    return _fingerprint(data, train_source, eval_source)


def iterate_batches(
    examples: list[Example],
    *,
    batch_size: int,
    seed: int,
    pad_id: int,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """An infinite, deterministic stream of training micro-batches for one rank.

    The order is a pure function of `seed`: epoch e visits the examples in the order
    `torch.randperm(n, generator=<seeded from (seed, e)>)`, and the epochs are laid end to end into one
    stream. Global micro-batch i is the `batch_size * world_size` examples at stream positions
    [i*B*W, (i+1)*B*W), and rank r takes the r-th slice of B of them. Nothing is dropped: a batch may span
    the end of one epoch and the start of the next. Hence:

    - resume is exact and cheap: `start=i` yields what the uninterrupted stream yields from batch i on,
      without generating the batches before it;
    - one worker with batch 2B sees the same examples per step as two workers with batch B each.

    Each batch is padded on the right to its longest row: `input_ids` with `pad_id`, `labels` with -100,
    `attention_mask` 0, and `position_ids` continuing past the last real position. `attention_mask` marks
    padding only; packed rows carry their document boundaries in `position_ids`. Packed rows all hold
    exactly `data.max_length` tokens, so a packed batch has no padding and an all-ones mask, which the loop
    must drop: transformers 5 builds the block-diagonal causal mask from restarting position ids only when
    `attention_mask` is None and no KV cache is built (`use_cache=False`); given a mask, packed documents
    attend to each other.

    Args:
        examples: the training examples (`TokenizedData.train`).
        batch_size: examples per micro-batch on each rank.
        seed: the data-order seed (`training.seed`).
        pad_id: the tokenizer's pad token id.
        start: index of the first global micro-batch to yield (optimizer step * grad accumulation steps).
        rank: this worker's rank.
        world_size: the number of workers.

    Yields:
        dicts of int64 tensors `input_ids`, `labels`, `position_ids`, `attention_mask`, each [B, T].
    """
    _check_batching(examples, batch_size, rank, world_size)
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    n = len(examples)
    permutations: dict[int, list[int]] = {}
    step = start
    while True:
        first = (step * world_size + rank) * batch_size
        rows = []
        for position in range(first, first + batch_size):
            epoch = position // n
            if epoch not in permutations:
                permutations = {e: p for e, p in permutations.items() if e >= epoch - 1}  # keep memory flat
                generator = torch.Generator().manual_seed(_derive_seed(seed, "epoch", epoch))
                permutations[epoch] = torch.randperm(n, generator=generator).tolist()
            rows.append(examples[permutations[epoch][position % n]])
        yield _collate(rows, pad_id)
        step += 1


def eval_batches(
    examples: list[Example],
    *,
    batch_size: int,
    pad_id: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """One ordered pass over the eval split, sharded by rank; each example lands on exactly one rank.

    Sharded like `iterate_batches` without the shuffle: global batch j is examples [j*B*W, (j+1)*B*W) and
    rank r takes its slice of B, so every rank yields the same number of batches (FSDP needs every rank in
    every forward) and a cap on eval batches covers the same examples for any worker count. Where the last
    global batch has nothing left for a rank, that rank gets one filler row (a single pad token with label
    -100), which adds no loss and no targets. Ranks may therefore hold unequal numbers of real examples.

    Yields:
        dicts of int64 tensors as in `iterate_batches`.
    """
    _check_batching(examples, batch_size, rank, world_size, allow_empty=True)
    per_step = batch_size * world_size
    for first in range(0, len(examples), per_step):
        rows = examples[first + rank * batch_size : first + (rank + 1) * batch_size]
        if not rows:
            rows = [Example(input_ids=[pad_id], labels=[IGNORE_INDEX], position_ids=[0])]
        yield _collate(rows, pad_id)


# ---- rendering records into tokens -------------------------------------------------------------------------


def _render_text(value: Any, where: str, data: DataConfig, tokenizer: Any) -> tuple[list[int], list[bool]]:
    record = _as_record(value, where)
    text = _string_field(record, data.text_field, "data.text_field", where)
    ids = _bos(tokenizer) + _encode(tokenizer, text) + _eos(tokenizer)
    return ids, [True] * len(ids)


def _render_instruction(
    value: Any, where: str, data: DataConfig, tokenizer: Any
) -> tuple[list[int], list[bool]]:
    record = _as_record(value, where)
    instruction = _string_field(record, data.instruction_field, "data.instruction_field", where)
    input_ = _string_field(record, data.input_field, "data.input_field", where, required=False)
    response = _string_field(record, data.response_field, "data.response_field", where)
    # Prompt and response are tokenized apart so that the mask boundary falls exactly between them.
    prompt_ids = _bos(tokenizer) + _encode(tokenizer, instruction_prompt(instruction, input_))
    response_ids = _encode(tokenizer, response) + _eos(tokenizer)
    return prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids)


def _render_chat(value: Any, where: str, data: DataConfig, tokenizer: Any) -> tuple[list[int], list[bool]]:
    record = _as_record(value, where)
    name = data.messages_field
    if name not in record:
        raise _missing(record, name, "data.messages_field", where)
    messages = record[name]
    if not isinstance(messages, list) or not messages:
        raise RecordProblem(
            f"{where}: field `{name}` must be a non-empty list of {{role, content}} objects, got "
            f"{_show(messages)}"
        )
    for k, message in enumerate(messages, start=1):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise RecordProblem(
                f"{where}: message {k} of `{name}` must be an object with string `role` and `content`, got "
                f"{_show(message)}"
            )
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise RecordProblem(
            f"{where}: `{name}` has no message with role 'assistant'; the chat format trains on assistant "
            "turns only, so this record would train nothing: add the answer or remove the record"
        )

    def render(msgs: list[dict], prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
        except Exception as error:  # jinja raise_exception(), e.g. "roles must alternate"
            raise RecordProblem(f"{where}: the chat template rejected the messages: {error}") from None

    # The trained span of assistant turn i is what rendering messages[:i+1] adds to rendering messages[:i]
    # with the generation prompt: its content and closing tokens, without the assistant header.
    text = render(messages, False)
    spans = []
    for i in assistant:
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise RecordProblem(
                f"{where}: the chat template does not render message {i + 1} as a continuation of the "
                "messages before it, so its tokens cannot be located; use a chat template that renders "
                "conversations append-only, or format `text`"
            )
        spans.append((len(before), len(through)))

    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    # A token is trained when it overlaps an assistant span: a token that straddles the boundary (such as
    # SentencePiece's "▁answer") carries the answer's first characters.
    trained = [any(s < end and (e > begin or s == e >= begin) for begin, end in spans) for s, e in offsets]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids, trained = [bos, *ids], [False, *trained]
    return ids, trained


_RENDERERS = {"text": _render_text, "instruction": _render_instruction, "chat": _render_chat}


def _to_example(ids: list[int], trained: list[bool], where: str, max_length: int) -> tuple[Example, bool]:
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained, strict=True)]
    if labels:
        labels[0] = IGNORE_INDEX  # nothing precedes the first token: never a target (see module docstring)
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise RecordProblem(
            f"{where}: no trained tokens left after truncation to `data.max_length` = {max_length} "
            f"(the untruncated example is {len(trained)} tokens, the prompt "
            f"{trained.index(True) if True in trained else len(trained)} of them); raise `data.max_length` "
            "or shorten the record"
        )
    return Example(input_ids=ids, labels=labels, position_ids=list(range(len(ids)))), truncated


def _as_record(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise RecordProblem(f"{where}: expected an object with named fields, got {_show(value)}")
    return value


def _string_field(record: dict, name: str, config_field: str, where: str, *, required: bool = True) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise _missing(record, name, config_field, where)
        return ""
    if not isinstance(value, str):
        raise RecordProblem(
            f"{where}: field `{name}` must be a string, got {_show(value)}; fix the record or point "
            f"`{config_field}` at a text field"
        )
    if required and not value.strip():
        raise RecordProblem(f"{where}: field `{name}` is empty; fill it in or remove the record")
    return value


def _missing(record: dict, name: str, config_field: str, where: str) -> RecordProblem:
    message = "null" if name in record else "missing"
    return RecordProblem(
        f"{where}: {message} field `{name}` (`{config_field}` = {name!r}); records have: "
        f"{', '.join(sorted(map(str, record))) or 'no fields'}; "
        f"set `{config_field}` to the field that holds it"
    )


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer: Any) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [] if bos is None else [bos]


def _eos(tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [] if eos is None else [eos]


# ---- splitting, packing, batching --------------------------------------------------------------------------


def _hold_out(docs: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random `fraction` (at least one) of the records for eval, the rest for training, in order."""
    n = len(docs)
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise ConfigError(
            f"`data.eval_fraction` = {fraction} of {n} record(s) leaves {n - n_eval} for training and "
            f"{n_eval} for eval; each split needs at least one record: add records, lower "
            "`data.eval_fraction`, or set `data.eval_path` to a separate eval file"
        )
    generator = torch.Generator().manual_seed(_derive_seed(seed, "eval-split"))
    held = set(torch.randperm(n, generator=generator)[:n_eval].tolist())
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def _pack(docs: list[Example], max_length: int, filler: int, *, order_seed: int | None) -> list[Example]:
    """Concatenate documents into rows of exactly `max_length` tokens.

    A document that does not fit in what is left of a row is split: its head fills the row, and its tail
    starts the next row repeating the head's last token as untrained context (position 0, label -100), so
    that the tail's first token is still a target. No trained token is lost; rows hold a few more inputs.

    The last row is topped up with an untrained segment of `filler` tokens (its own document, positions
    from 0) rather than padding: a batch that needs no padding needs no attention mask, and only without
    one does transformers build the block-diagonal mask from the position ids. A short row padded in a
    batch would make the loop pass a mask, and every packed row of that batch would attend across its
    documents.
    """
    order = range(len(docs))
    if order_seed is not None:
        order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(order_seed)).tolist()
    rows: list[Example] = []
    row = Example([], [], [])
    for index in order:
        ids, labels = docs[index].input_ids, docs[index].labels
        while ids:
            space = max_length - len(row)
            if len(ids) <= space:
                head_ids, head_labels, ids = ids, labels, []
            else:
                head_ids, head_labels = ids[:space], labels[:space]
                ids, labels = ids[space - 1 :], [IGNORE_INDEX, *labels[space:]]
            row.input_ids += head_ids
            row.labels += head_labels
            row.position_ids += range(len(head_ids))
            if len(row) == max_length:
                rows.append(row)
                row = Example([], [], [])
    if len(row):
        gap = max_length - len(row)
        row.input_ids += [filler] * gap
        row.labels += [IGNORE_INDEX] * gap
        row.position_ids += range(gap)
        rows.append(row)
    return rows


def _trained_tokens(examples: list[Example]) -> int:
    return sum(sum(label != IGNORE_INDEX for label in e.labels) for e in examples)


def _collate(rows: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        attention_mask[i, :n] = 1
        last = row.position_ids[-1] if n else -1
        position_ids[i, :n] = torch.tensor(row.position_ids)
        position_ids[i, n:] = torch.arange(last + 1, last + 1 + width - n)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
    }


def _check_batching(
    examples: list[Example], batch_size: int, rank: int, world_size: int, *, allow_empty: bool = False
) -> None:
    if not examples and not allow_empty:
        raise ValueError("no examples to batch")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")


def _derive_seed(*parts: Any) -> int:
    """A 63-bit seed from several parts: (seed, epoch) pairs never collide the way seed + epoch would."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _fingerprint(data: DataConfig, train: Source, eval_: Source | None) -> str:
    fields = {
        name: getattr(data, name)
        for name in (
            "format",
            "text_field",
            "instruction_field",
            "input_field",
            "response_field",
            "messages_field",
            "max_length",
            "packing",
        )
    }
    key = json.dumps(
        {
            "rendering": _RENDERING_VERSION,
            "train": train.digest,
            "eval": eval_.digest if eval_ else None,
            "fields": fields,
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()
