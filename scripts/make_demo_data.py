"""Write the packaged demo data: `raylora/demo_data/demo.jsonl` and `raylora/demo_data/demo_chat.jsonl`.

Regenerate (the output is byte-for-byte the same on every machine; `tests/test_data.py` checks that the
shipped files match this script):

    python scripts/make_demo_data.py            # writes into raylora/demo_data/
    python scripts/make_demo_data.py OUT_DIR    # writes somewhere else

The tasks are chosen so that a 2-layer byte-level model trained from a random init shows a clearly falling
loss within ~100 steps: five short templated tasks with a small output alphabet (case mapping, list reversal,
small sums, and two fixed lookup tables). Every record stays far below the demo's `data.max_length` of 128
tokens (one token per byte) once wrapped in the instruction prompt, so nothing is truncated.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 20240601
N_INSTRUCTION = 600
N_CHAT = 50
# Bytes of instruction + input + output; the prompt template and bos/eos add 48 more.
MAX_FIELD_BYTES = 72
# Rendered conversations (tiny-llama's chat template, one token per byte) stay under this, below 128.
MAX_CHAT_BYTES = 120

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Egypt", "Cairo"), ("Canada", "Ottawa"),
    ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Greece", "Athens"),
    ("Russia", "Moscow"), ("India", "New Delhi"), ("Brazil", "Brasilia"), ("Mexico", "Mexico City"),
    ("Chile", "Santiago"), ("Cuba", "Havana"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
    ("Poland", "Warsaw"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Portugal", "Lisbon"),
    ("Turkey", "Ankara"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Argentina", "Buenos Aires"),
]  # fmt: skip

ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("light", "dark"),
    ("happy", "sad"), ("open", "closed"), ("early", "late"), ("old", "new"), ("high", "low"),
    ("full", "empty"), ("hard", "soft"), ("wet", "dry"), ("rich", "poor"), ("strong", "weak"),
    ("long", "short"), ("near", "far"), ("loud", "quiet"), ("thick", "thin"), ("clean", "dirty"),
    ("first", "last"), ("win", "lose"), ("push", "pull"), ("day", "night"), ("in", "out"),
]  # fmt: skip

WORDS = [
    "apple", "river", "stone", "cloud", "tiger", "piano", "garden", "silver", "rocket", "candle",
    "forest", "window", "pencil", "orange", "bridge", "planet", "castle", "dragon", "summer", "winter",
    "yellow", "purple", "coffee", "lemon", "honey", "ocean", "button", "mirror", "violin", "pepper",
    "rabbit", "turtle", "wagon", "basket", "jacket", "ladder", "marble", "needle", "saddle", "tunnel",
]  # fmt: skip

SHORT_WORDS = [
    "cat", "dog", "sun", "red", "cup", "hat", "box", "pen", "map", "egg", "owl", "fox", "ink", "jam",
]  # fmt: skip


def _uppercase(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    return "Uppercase the word.", word, word.upper()


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    items = rng.sample(SHORT_WORDS, rng.randint(3, 4))
    return "Reverse the list.", ", ".join(items), ", ".join(reversed(items))


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return "Add the numbers.", f"{a} + {b}", str(a + b)


def _capital(rng: random.Random) -> tuple[str, str, str]:
    country, capital = rng.choice(CAPITALS)
    return f"What is the capital of {country}?", "", capital  # no input: the other prompt template


def _opposite(rng: random.Random) -> tuple[str, str, str]:
    word, opposite = rng.choice(ANTONYMS)
    if rng.random() < 0.5:
        word, opposite = opposite, word
    return "Give the opposite.", word, opposite


TASKS = [_uppercase, _reverse, _add, _capital, _opposite]


def instruction_records(rng: random.Random, n: int) -> list[dict[str, str]]:
    """`n` records, the tasks in equal shares, in a shuffled order."""
    records = []
    for i in range(n):
        instruction, input_, output = TASKS[i % len(TASKS)](rng)
        assert len(f"{instruction}{input_}{output}".encode()) <= MAX_FIELD_BYTES, (
            instruction,
            input_,
            output,
        )
        records.append({"instruction": instruction, "input": input_, "output": output})
    rng.shuffle(records)
    return records


def chat_records(rng: random.Random, n: int) -> list[dict[str, list[dict[str, str]]]]:
    """`n` conversations: odd ones have two user/assistant turns; every fourth has a system message."""
    records = []
    for i in range(n):
        messages = [{"role": "system", "content": "Answer briefly."}] if i % 4 == 0 else []
        turns = []
        while len(turns) < 1 + (i % 2):
            instruction, input_, output = rng.choice(TASKS)(rng)
            turns.append((f"{instruction} {input_}".strip(), output))
            # ~18 bytes of chat markup per turn ("[INST] ", " [/INST] ", eos, newline), bos, the system turn
            if sum(len(u) + len(a) + 18 for u, a in turns) + 1 + 18 * len(messages) > MAX_CHAT_BYTES:
                turns.pop()
        for user, answer in turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        records.append({"messages": messages})
    return records


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(out_dir: str | None = None) -> None:
    out = Path(out_dir) if out_dir else Path(__file__).resolve().parent.parent / "raylora" / "demo_data"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    _write_jsonl(out / "demo.jsonl", instruction_records(rng, N_INSTRUCTION))
    _write_jsonl(out / "demo_chat.jsonl", chat_records(rng, N_CHAT))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
