"""Where training records come from: a local file, a directory of files, a hub dataset, or the packaged demo.

`read_source` turns `data.path` (and `read_eval_source` `data.eval_path`) into a list of records, each
with where it came from ("data/train.jsonl record 17") for error messages, and a digest of the bytes for the
dataset fingerprint. A name that looks like a local path is never sent to the hub as a dataset id (where it
would fail with a confusing message), and a file that cannot be parsed is an error naming the file and the
line. What a record means (its fields, its rendering into tokens) is `raylora.data`'s concern.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylora.config import ConfigError, DataConfig

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "Record",
    "RecordProblem",
    "Source",
    "capped",
    "read_eval_source",
    "read_source",
]

logger = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
_MAX_PROBLEMS = 10  # record problems listed in one error; the rest are counted
_DEMO_FILES = {"chat": "demo_chat.jsonl"}  # every other format reads demo.jsonl (instruction records)
# Names ending in these are taken for local paths even when they do not exist (hub ids never end so).
_PATH_SUFFIXES = (*SUPPORTED_EXTENSIONS, ".txt", ".tsv", ".arrow", ".gz", ".zip", ".xlsx", ".xz", ".bz2")


@dataclass
class Record:
    value: Any
    where: str  # "data/train.jsonl record 17", for error messages


@dataclass
class Source:
    records: list[Record]
    label: str  # what the summary calls the source
    digest: str  # sha256 of the bytes, or of the hub id + split + datasets fingerprint
    hub: bool = False


class RecordProblem(Exception):
    """One record that cannot become an example; collected, then raised together as a ConfigError."""


def read_source(data: DataConfig) -> Source:
    if data.path == "demo":
        name = _DEMO_FILES.get(data.format, "demo.jsonl")
        resource = importlib.resources.files("raylora") / "demo_data" / name
        with importlib.resources.as_file(resource) as path:
            return _read_files([path], label=f"demo ({name})", display=lambda p: name)
    path = _local_path(data.path, "data.path")
    if path is not None:
        return _read_local(path, data.path, "data.path")
    return _read_hub(data, data.split, "data.path")


def read_eval_source(data: DataConfig, *, hub: bool) -> Source:
    assert data.eval_path is not None
    # Beside a hub dataset, an eval_path that is not a local file names another split of the same dataset.
    if hub and not Path(data.eval_path).expanduser().exists():
        return _read_hub(data, data.eval_path, "data.eval_path")
    path = _local_path(data.eval_path, "data.eval_path", hub_allowed=False)
    return _read_local(path, data.eval_path, "data.eval_path")


def _local_path(value: str, field: str, *, hub_allowed: bool = True) -> Path | None:
    """The local file or directory that `value` names; None when it should be read as a hub dataset id."""
    path = Path(value).expanduser()
    if path.exists():
        if path.is_file() and _extension(path) not in SUPPORTED_EXTENSIONS:
            kind = f"a {_extension(path)} file" if _extension(path) else "a file without an extension"
            raise ConfigError(
                f"`{field}` is {value!r}, {kind}; supported files are {', '.join(SUPPORTED_EXTENSIONS)} "
                "(or a directory of them): convert it to one of those"
            )
        return path
    looks_local = (
        value.startswith((".", "~", "/", "\\"))
        or os.path.isabs(value)
        or value.lower().endswith(_PATH_SUFFIXES)
        or value.count("/") > 1
        or "\\" in value
    )
    if looks_local or not hub_allowed:
        raise ConfigError(
            f"`{field}` is {value!r}, which does not exist (looked for {path.absolute()}); give an existing "
            f"{'/'.join(SUPPORTED_EXTENSIONS)} file or a directory of them"
            + (
                ", `demo` for the packaged demo data, or a hub dataset id like `owner/name`"
                if hub_allowed
                else ""
            )
        )
    return None


def _read_local(path: Path, value: str, field: str) -> Source:
    if path.is_file():
        return _read_files([path], label=value, display=lambda p: value)
    files, ignored = [], []
    for p in sorted(path.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts):
            (files if _extension(p) in SUPPORTED_EXTENSIONS else ignored).append(p)
    if not files:
        raise ConfigError(
            f"`{field}` is {value!r}, a directory with no {', '.join(SUPPORTED_EXTENSIONS)} files in it; "
            "put the data files there or point at a file"
        )
    if ignored:
        logger.warning(
            "%s: ignoring %d files of other types: %s", value, len(ignored), [str(p) for p in ignored]
        )
    return _read_files(files, label=value, display=str)


def _read_files(paths: list[Path], *, label: str, display: Callable[[Path], str]) -> Source:
    digest = hashlib.sha256()
    records: list[Record] = []
    problems: list[str] = []
    for path in paths:
        raw = path.read_bytes()
        digest.update(hashlib.sha256(raw).digest())
        name = display(path)
        try:
            values = _parse(raw, _extension(path), name)
        except RecordProblem as problem:
            problems.extend(problem.args[0])
            continue
        for number, (value, line) in enumerate(values, start=1):
            where = f"{name} record {number}" + (f" (line {line})" if line not in (None, number) else "")
            records.append(Record(value, where))
    if problems:
        raise ConfigError(capped(problems))
    return Source(records=records, label=label, digest=digest.hexdigest())


def _parse(raw: bytes, extension: str, name: str) -> list[tuple[Any, int | None]]:
    """(record, 1-based line or None) pairs; raises RecordProblem with a list of messages."""
    try:
        if extension in (".jsonl", ".json"):
            text = raw.decode("utf-8-sig")
        if extension == ".jsonl":
            return _parse_json_lines(text, name)
        if extension == ".json":
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                if error.msg == "Extra data":  # several top-level values: JSON lines in a .json file
                    return _parse_json_lines(text, name)
                raise RecordProblem(
                    [f"{name} line {error.lineno}: not valid JSON ({error.msg}, column {error.colno})"]
                ) from None
            if not isinstance(value, list):
                raise RecordProblem(
                    [
                        f"{name}: expected a JSON array of records at the top level, got "
                        f"{type(value).__name__}; write the records as an array, or one per line as .jsonl"
                    ]
                )
            return [(v, None) for v in value]
        if extension == ".csv":
            import pandas as pd

            # Every cell as a string and empty cells as "": CSV has no types, and "NA" is a word, not a null.
            try:
                frame = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False, encoding="utf-8")
            except pd.errors.EmptyDataError:
                return []
            return [(row, None) for row in frame.to_dict("records")]
        if extension == ".parquet":
            import pyarrow.parquet as pq

            return [(row, None) for row in pq.read_table(io.BytesIO(raw)).to_pylist()]
    except UnicodeDecodeError as error:
        raise RecordProblem([f"{name}: not UTF-8 text ({error.reason} at byte {error.start})"]) from None
    except RecordProblem:
        raise
    except Exception as error:  # pandas / pyarrow parse errors: name the file, keep their message
        raise RecordProblem([f"{name}: cannot read it as {extension[1:]}: {error}"]) from None
    raise AssertionError(extension)


def _parse_json_lines(text: str, name: str) -> list[tuple[Any, int | None]]:
    values, problems = [], []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends, which splitlines() breaks on.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            values.append((json.loads(line), line_number))
        except json.JSONDecodeError as error:
            problems.append(
                f"{name} line {line_number}: not valid JSON ({error.msg}, column {error.colno}); "
                "each line of a JSON-lines file must be one complete JSON object"
            )
    if problems:
        raise RecordProblem(problems)
    return values


def _read_hub(data: DataConfig, split: str, field: str) -> Source:
    import datasets

    try:
        dataset = datasets.load_dataset(data.path, name=data.subset, split=split)
    except Exception as error:  # no such dataset/split/subset, no network: all one fix for the user
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        value = data.path if field == "data.path" else split
        raise ConfigError(
            f"`{field}` is {value!r}, which is not a local file or directory and could not be loaded as a "
            f"hub dataset (path {data.path!r}, subset {data.subset!r}, split {split!r}): {reason}; give an "
            f"existing {'/'.join(SUPPORTED_EXTENSIONS)} file or directory, `demo`, or a reachable hub "
            "dataset id with `data.subset` and `data.split` set to ones it has"
        ) from error
    label = f"{data.path}[{split}]" if data.subset is None else f"{data.path}/{data.subset}[{split}]"
    records = [Record(row, f"{label} record {i}") for i, row in enumerate(dataset.to_list(), start=1)]
    key = json.dumps([data.path, data.subset, split, getattr(dataset, "_fingerprint", None)])
    return Source(records=records, label=label, digest=hashlib.sha256(key.encode()).hexdigest(), hub=True)


def _extension(path: Path) -> str:
    return path.suffix.lower()


def capped(problems: list[str]) -> list[str]:
    """At most `_MAX_PROBLEMS` problems, and a line counting the rest."""
    if len(problems) <= _MAX_PROBLEMS:
        return problems
    return [*problems[:_MAX_PROBLEMS], f"... and {len(problems) - _MAX_PROBLEMS} more problems like these"]
