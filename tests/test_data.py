"""Data loading, formats, masks, packing and batch order, with the tiny preset's real byte-level tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pandas as pd
import pytest
import torch

from raylora.config import ConfigError, DataConfig, demo_config
from raylora.data import (
    IGNORE_INDEX,
    Example,
    eval_batches,
    instruction_prompt,
    iterate_batches,
    load_data,
)
from raylora.packed import pack_key

REPO = Path(__file__).resolve().parent.parent

RECORDS = [
    {"instruction": "Uppercase the word.", "input": "apple", "output": "APPLE"},
    {"instruction": "What is the capital of Peru?", "input": "", "output": "Lima"},
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
    {"instruction": "Give the opposite.", "input": "hot", "output": "cold"},
    {"instruction": "Reverse the list.", "input": "cat, dog, sun", "output": "sun, dog, cat"},
    {"instruction": "Uppercase the word.", "input": "héllo wörld", "output": "HÉLLO WÖRLD"},
]

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Uppercase the word. apple"},
    {"role": "assistant", "content": "APPLE"},
    {"role": "user", "content": "What is the capital of Peru?"},
    {"role": "assistant", "content": "Lima"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_path)


def _write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _load(path: str, tokenizer, seed: int = 0, **fields):
    return load_data(DataConfig(path=path, **fields), tokenizer, seed=seed)


def _trained(tokenizer, example: Example) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def _runs(example: Example) -> list[list[int]]:
    """The maximal runs of consecutive trained labels."""
    runs, current = [], []
    for label in example.labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


# ---- formats and masks ------------------------------------------------------------------------------------


def test_instruction_trains_the_response_and_eos_only(tmp_path, tokenizer):
    data = _load(_write_jsonl(tmp_path / "d.jsonl", RECORDS), tokenizer, eval_path=str(tmp_path / "d.jsonl"))
    assert data.summary.train_records == len(RECORDS) and data.summary.truncated == 0
    for record, example in zip(RECORDS, data.train, strict=True):
        prompt = instruction_prompt(record["instruction"], record["input"])
        assert tokenizer.decode(example.input_ids) == f"<s>{prompt}{record['output']}</s>"
        n_prompt = 1 + len(prompt.encode())  # bos + one token per byte
        assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert _trained(tokenizer, example) == record["output"] + "</s>"
        assert example.position_ids == list(range(len(example)))
    assert "### Input:\n" not in tokenizer.decode(data.train[1].input_ids)  # empty input: no input section


def test_text_trains_every_token_after_bos(tmp_path, tokenizer):
    texts = ["hello world", "a second, longer document with ünïcode"]
    path = _write_jsonl(tmp_path / "t.jsonl", [{"body": t} for t in texts])
    data = _load(path, tokenizer, format="text", text_field="body", eval_path=path)
    for text, example in zip(texts, data.train, strict=True):
        assert example.input_ids[0] == tokenizer.bos_token_id
        assert example.labels[0] == IGNORE_INDEX
        assert example.labels[1:] == example.input_ids[1:]
        assert _trained(tokenizer, example) == text + "</s>"


def test_chat_trains_only_assistant_turns(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    example = _load(path, tokenizer, format="chat", eval_path=path).train[0]
    # The ids are exactly what the chat template tokenizes to (bos written by the template, not added twice).
    assert example.input_ids == list(tokenizer.apply_chat_template(CHAT, tokenize=True)["input_ids"])
    assert example.input_ids.count(tokenizer.bos_token_id) == 1
    runs = [tokenizer.decode(run) for run in _runs(example)]
    assert runs == ["APPLE</s>\n", "Lima</s>\n"]  # each answer with its closing tokens, nothing else


def test_the_demo_data_loads_untruncated_and_the_generator_reproduces_it(tmp_path, tokenizer):
    for fmt, name, records in (("instruction", "demo.jsonl", 600), ("chat", "demo_chat.jsonl", 50)):
        config = demo_config().data
        config.format = fmt
        data = load_data(config, tokenizer, seed=0)
        summary = data.summary
        assert summary.source == f"demo ({name})"
        assert summary.train_records + summary.eval_records == records
        assert summary.eval_records == round(records * config.eval_fraction)
        assert summary.truncated == 0
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_data.py"), str(tmp_path)], check=True)
    for name in ("demo.jsonl", "demo_chat.jsonl"):
        assert (tmp_path / name).read_bytes() == (REPO / "raylora" / "demo_data" / name).read_bytes()


def test_the_eval_split_follows_its_own_seed_not_the_training_seed(tokenizer):
    """A sweep that searches `training.seed` evaluates every trial on the same records (`data.split_seed`)."""

    def eval_set(data: DataConfig, seed: int) -> list[list[int]]:
        return [example.input_ids for example in load_data(data, tokenizer, seed=seed).eval]

    data = demo_config().data
    assert eval_set(data, seed=0) == eval_set(data, seed=1) == eval_set(data, seed=12345)
    data.split_seed = 1
    assert eval_set(data, seed=0) != eval_set(demo_config().data, seed=0)
    # Packs share their data: trials that differ in their training seed alone still share a pack, unless
    # packing lays out the train rows by that seed.
    configs = [demo_config(), demo_config()]
    configs[1].training.seed = 7
    assert pack_key(configs[0]) == pack_key(configs[1])
    for config in configs:
        config.data.packing = True
    assert pack_key(configs[0]) != pack_key(configs[1])
    data.split_seed = -1
    assert data.problems() == ["`data.split_seed` must be a non-negative integer, got -1"]


# ---- sources -----------------------------------------------------------------------------------------------


def test_every_file_type_and_a_directory_give_the_same_examples(tmp_path, tokenizer):
    frame = pd.DataFrame(RECORDS)
    paths = {
        "jsonl": _write_jsonl(tmp_path / "d.jsonl", RECORDS),
        "json": str(tmp_path / "d.json"),
        "csv": str(tmp_path / "d.csv"),
        "parquet": str(tmp_path / "d.parquet"),
    }
    Path(paths["json"]).write_text(json.dumps(RECORDS), encoding="utf-8")
    frame.to_csv(paths["csv"], index=False)
    frame.to_parquet(paths["parquet"], index=False)
    split = tmp_path / "split"
    split.mkdir()
    _write_jsonl(split / "a.jsonl", RECORDS[:2])
    frame.iloc[2:].to_parquet(split / "b.parquet", index=False)
    paths["directory"] = str(split)

    loaded = {kind: _load(path, tokenizer, eval_fraction=0.3) for kind, path in paths.items()}
    reference = loaded["jsonl"]
    assert reference.summary.eval_records == 2
    for kind, data in loaded.items():
        assert data.train == reference.train, kind
        assert data.eval == reference.eval, kind
        assert data.summary.train_trained_tokens == reference.summary.train_trained_tokens


def test_the_fingerprint_follows_content_and_tokenisation_not_the_file_name(tmp_path, tokenizer):
    a = _write_jsonl(tmp_path / "a.jsonl", RECORDS)
    b = _write_jsonl(tmp_path / "b.jsonl", RECORDS)
    c = _write_jsonl(tmp_path / "c.jsonl", RECORDS[:-1])
    fingerprint = _load(a, tokenizer).summary.fingerprint
    assert len(fingerprint) == 64
    assert _load(b, tokenizer).summary.fingerprint == fingerprint
    assert _load(c, tokenizer).summary.fingerprint != fingerprint
    assert _load(a, tokenizer, max_length=100).summary.fingerprint != fingerprint


def test_chat_records_from_parquet_match_jsonl(tmp_path, tokenizer):
    records = [{"messages": CHAT}, {"messages": CHAT[1:3]}]
    jsonl = _write_jsonl(tmp_path / "c.jsonl", records)
    pd.DataFrame(records).to_parquet(tmp_path / "c.parquet", index=False)
    a = _load(jsonl, tokenizer, format="chat", eval_path=jsonl)
    b = _load(str(tmp_path / "c.parquet"), tokenizer, format="chat", eval_path=jsonl)
    assert a.train == b.train


# ---- bad input: one ConfigError, naming the field, the value and the fix ----------------------------------


def test_missing_file(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match=r"`data.path` is '.*nope\.jsonl', which does not exist"):
        _load(str(tmp_path / "nope.jsonl"), tokenizer)
    with pytest.raises(ConfigError, match=r"`data.eval_path` is 'test', which does not exist"):
        _load(_write_jsonl(tmp_path / "d.jsonl", RECORDS), tokenizer, eval_path="test")


def test_unsupported_extension(tmp_path, tokenizer):
    (tmp_path / "d.txt").write_text("hello\n")
    with pytest.raises(
        ConfigError, match=r"a \.txt file; supported files are \.jsonl, \.json, \.csv, \.parquet"
    ):
        _load(str(tmp_path / "d.txt"), tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"a directory with no \.jsonl, \.json, \.csv, \.parquet files"):
        _load(str(tmp_path / "empty"), tokenizer)


def test_malformed_json_names_the_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps(RECORDS[0]) + "\n\n" + '{"instruction": "x", "output": \n' + json.dumps(RECORDS[1])
    )
    with pytest.raises(ConfigError, match=r"bad\.jsonl line 3: not valid JSON"):
        _load(str(path), tokenizer)
    whole = tmp_path / "bad.json"
    whole.write_text('[\n  {"instruction": "x",\n   "output": }\n]')
    with pytest.raises(ConfigError, match=r"bad\.json line 3: not valid JSON"):
        _load(str(whole), tokenizer)


def test_missing_field_names_the_record_and_the_field(tmp_path, tokenizer):
    records = [*RECORDS, {"instruction": "Say hi.", "response": "hi"}]
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(
        ConfigError,
        match=r"d\.jsonl record 7: missing field `output` \(`data\.response_field` = 'output'\); "
        r"records have: instruction, response",
    ):
        _load(path, tokenizer)


def test_bad_records_are_reported_together_and_capped(tmp_path, tokenizer):
    records = [
        RECORDS[0],
        "just a string",
        {"instruction": 3, "output": "x"},
        {"instruction": "x", "output": "  "},
    ]
    records += [{"instruction": "x"}] * 12
    with pytest.raises(ConfigError) as caught:
        _load(_write_jsonl(tmp_path / "d.jsonl", records), tokenizer)
    problems = caught.value.problems
    assert len(problems) == 11 and problems[-1] == "... and 5 more problems like these"
    assert "d.jsonl record 2: expected an object with named fields, got str 'just a string'" in problems[0]
    assert "d.jsonl record 3: field `instruction` must be a string, got int 3" in problems[1]
    assert "d.jsonl record 4: field `output` is empty" in problems[2]
    assert "d.jsonl record 5: missing field `output`" in problems[3]
    chat = [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": "hi"},
        {"messages": [{"role": "user"}]},
    ]
    with pytest.raises(ConfigError) as caught:
        _load(_write_jsonl(tmp_path / "c.jsonl", chat), tokenizer, format="chat")
    assert [
        p.split(":")[0].endswith(f"c.jsonl record {i}") for i, p in enumerate(caught.value.problems, 1)
    ] == [True] * 3
    assert "no message with role 'assistant'" in caught.value.problems[0]


def test_empty_dataset(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match=r"`data.path` is '.*empty\.jsonl', which holds no records"):
        _load(str(tmp_path / "empty.jsonl"), tokenizer)


def test_eval_fraction_leaving_a_split_empty(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "one.jsonl", RECORDS[:1])
    with pytest.raises(
        ConfigError, match=r"`data.eval_fraction` = 0.1 of 1 record\(s\) leaves 0 for training"
    ):
        _load(path, tokenizer)


def test_nothing_left_to_train_after_truncation(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", RECORDS)
    with pytest.raises(ConfigError, match=r"record 1: no trained tokens left .* raise `data.max_length`"):
        _load(path, tokenizer, max_length=16)


def test_an_unreachable_hub_dataset_names_data_path(tokenizer):
    with pytest.raises(
        ConfigError, match=r"`data.path` is 'nobody/no-such-dataset', which is not a local file"
    ):
        _load("nobody/no-such-dataset", tokenizer)


# ---- truncation and packing --------------------------------------------------------------------------------


def test_truncation_is_counted(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "x" * 100}, {"text": "short"}, {"text": "y" * 50}])
    data = _load(path, tokenizer, format="text", max_length=32, eval_path=path)
    assert data.summary.truncated == 2 * 2  # two of three records, in both splits
    assert [len(e) for e in data.train] == [32, 7, 32]


@pytest.mark.parametrize("fmt", ["instruction", "chat"])
def test_packing_fills_rows_and_loses_no_trained_token(fmt, tokenizer):
    config = DataConfig(path="demo", format=fmt, max_length=512)
    plain = load_data(config, tokenizer, seed=3)
    config.packing = True
    packed = load_data(config, tokenizer, seed=3)
    assert plain.summary.truncated == 0
    for split in ("train", "eval"):
        rows, docs = getattr(packed, split), getattr(plain, split)
        assert all(len(row) == config.max_length for row in rows)  # no padding, so no attention mask
        # A document split across rows repeats one token as context in the next row, and the last row ends
        # in an untrained filler segment (pad tokens from position 0); nothing else is added.
        last = rows[-1]
        fill = len(last) - 1 - last.position_ids[::-1].index(0)
        assert set(last.input_ids[fill:]) == {tokenizer.pad_token_id}
        assert set(last.labels[fill:]) == {IGNORE_INDEX}
        extra = sum(len(r) for r in rows) - sum(len(d) for d in docs) - (len(last) - fill)
        assert 0 <= extra <= len(rows) - 1
        # Every trained token survives, and each stays a target: never the first token of its row.
        trained = sorted(t for d in docs for t in d.labels if t != IGNORE_INDEX)
        assert sorted(t for r in rows for t in r.labels if t != IGNORE_INDEX) == trained
        assert all(r.labels[0] == IGNORE_INDEX for r in rows)
    assert packed.summary.train_trained_tokens == plain.summary.train_trained_tokens
    assert packed.summary.eval_trained_tokens == plain.summary.eval_trained_tokens
    # Position ids restart at each document boundary: the segments are exactly the documents (or their
    # split head/tail) laid end to end.
    doc_ids = {tuple(d.input_ids) for d in plain.train}
    for row in packed.train:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row)]
        segments = [row.input_ids[a:b] for a, b in pairwise(starts)]
        assert all(row.position_ids[a:b] == list(range(b - a)) for a, b in pairwise(starts))
        # Only the first segment (a tail) and the last (a head, or the filler) may be partial documents.
        assert sum(tuple(s) in doc_ids for s in segments) >= len(segments) - 2


def test_a_packed_row_attends_within_each_document(tiny_llama_path, tokenizer):
    """transformers 5 builds a block-diagonal mask from restarting position_ids when attention_mask is None
    and no cache is built (use_cache=False: Llama's config defaults to use_cache=True, and with a cache the
    packed-sequence detection is skipped)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_path, dtype=torch.float32, attn_implementation="sdpa"
    )
    rows = load_data(DataConfig(path="demo", max_length=512, packing=True), tokenizer, seed=0).train
    # A batch as the loop sees it: a full row and the last (filler-topped) row, no padding, so no mask.
    batch = next(iterate_batches([rows[0], rows[-1]], batch_size=2, seed=0, pad_id=tokenizer.pad_token_id))
    assert bool(batch["attention_mask"].all())
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        for ids, positions, logits in zip(batch["input_ids"], batch["position_ids"], packed, strict=True):
            starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
            assert len(starts) >= 3  # at least two segments in each row
            separate = [
                model(input_ids=ids[None, a:b], use_cache=False).logits[0] for a, b in pairwise(starts)
            ]
            torch.testing.assert_close(logits, torch.cat(separate), atol=1e-4, rtol=1e-4)


# ---- batches ----------------------------------------------------------------------------------------------


def _examples(n: int) -> list[Example]:
    """Distinct examples of varied length: example k starts with token k."""
    return [
        Example([k] + [300] * (k % 4), [IGNORE_INDEX] + [7] * (k % 4), list(range(1 + k % 4)))
        for k in range(n)
    ]


def _ids(batches, n: int) -> list[list[int]]:
    return [batch["input_ids"][:, 0].tolist() for _, batch in zip(range(n), batches, strict=False)]


def test_iterate_batches_is_deterministic_resumable_and_spans_epochs():
    examples = _examples(10)
    stream = _ids(iterate_batches(examples, batch_size=3, seed=5, pad_id=258), 20)
    assert stream == _ids(iterate_batches(examples, batch_size=3, seed=5, pad_id=258), 20)
    assert stream != _ids(iterate_batches(examples, batch_size=3, seed=6, pad_id=258), 20)
    for k in (1, 3, 7, 13):
        assert (
            _ids(iterate_batches(examples, batch_size=3, seed=5, pad_id=258, start=k), 20 - k) == stream[k:]
        )
    flat = [k for batch in stream for k in batch]
    for epoch in range(6):  # every epoch visits every example once, in its own order
        assert sorted(flat[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    assert flat[:10] != flat[10:20]


def test_one_worker_at_2b_sees_what_two_workers_at_b_see():
    examples = _examples(11)
    one = _ids(iterate_batches(examples, batch_size=4, seed=1, pad_id=258), 9)
    ranks = [
        _ids(iterate_batches(examples, batch_size=2, seed=1, pad_id=258, rank=r, world_size=2), 9)
        for r in (0, 1)
    ]
    assert one == [a + b for a, b in zip(*ranks, strict=True)]
    resumed = _ids(
        iterate_batches(examples, batch_size=2, seed=1, pad_id=258, start=4, rank=1, world_size=2), 5
    )
    assert resumed == ranks[1][4:]


def test_batches_pad_on_the_right():
    batch = next(iterate_batches(_examples(4)[1:4], batch_size=3, seed=0, pad_id=258))
    order = batch["input_ids"][:, 0].tolist()
    assert set(order) == {1, 2, 3}
    for row, k in enumerate(order):
        n = 1 + k % 4
        assert batch["input_ids"][row, n:].eq(258).all() and batch["labels"][row, n:].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (4 - n)
        assert batch["position_ids"][row].tolist() == [0, 1, 2, 3]  # continuing on the padding
    assert all(t.dtype == torch.long and t.shape == (3, 4) for t in batch.values())


def test_eval_batches_shard_every_example_once_with_equal_batch_counts():
    examples = _examples(10)
    single = [
        k for b in eval_batches(examples, batch_size=4, pad_id=258) for k in b["input_ids"][:, 0].tolist()
    ]
    assert single == list(range(10))
    shards = [list(eval_batches(examples, batch_size=2, pad_id=258, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [2, 2, 2]  # FSDP needs every rank in every forward
    firsts = [k for s in shards for b in s for k in b["input_ids"][:, 0].tolist()]
    assert sorted(k for k in firsts if k != 258) == list(range(10))
    filler = shards[2][1]  # the last global batch (examples 6..9) leaves rank 2 nothing
    assert filler["input_ids"].tolist() == [[258]] and filler["labels"].tolist() == [[IGNORE_INDEX]]
