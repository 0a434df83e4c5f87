"""A domain's training data: files in `adapters/<domain>/data/` -> chat rows.

Accepted shapes, one registry entry each (`ROW_SHAPES`):
  chat JSONL     {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
  alpaca         {"instruction": ..., "input": ..., "output": ...}
  prompt pairs   {"prompt": ..., "completion": ...}
  plain text     .txt files, one sample per blank-line-separated block (loss on every token)

Files named `eval*` are the fixed held-out split; every other file is training data.
Rows are checked one by one so a typo in line 812 costs that row, not the job: bad rows
are skipped and reported with file and line. The good rows become a `datasets.Dataset`.
A hub data set id is accepted too (only where the machine has network).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from engine.errors import NoTrainingData

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".txt")
ROLES = ("system", "user", "assistant")
FEEDBACK_FILE = "feedback.jsonl"


class BadRow(ValueError):
    """One row that cannot be used, with where it is."""

    def __init__(self, reason: str, file: str = "", line: int = 0) -> None:
        super().__init__(reason)
        self.reason, self.file, self.line = reason, file, line

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.reason}" if where else self.reason


# A row as the trainer sees it: {"messages": [...]} (loss on assistant turns) or
# {"text": "..."} (plain text, loss on every token).
Row = dict[str, Any]


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise BadRow(f"{key!r} must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise BadRow(f"{key!r} is empty")
    return value


def _chat(obj: dict[str, Any]) -> Row:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise BadRow("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRow(f"message {i} needs a role of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": _text(m.get("content"), f"messages[{i}].content")})
    while out and out[-1]["role"] != "assistant":
        out.pop()  # trailing turns without an answer teach nothing
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow("no assistant message to learn from")
    if not any(m["role"] == "user" for m in out):
        raise BadRow("no user message before the answer")
    return {"messages": out}


def _alpaca(obj: dict[str, Any]) -> Row:
    question = _text(obj["instruction"], "instruction")
    extra = obj.get("input") or ""
    if extra:
        question = f"{question}\n\n{_text(extra, 'input')}"
    return _pair(question, _text(obj.get("output"), "output"))


def _prompt_completion(obj: dict[str, Any]) -> Row:
    return _pair(_text(obj["prompt"], "prompt"), _text(obj.get("completion"), "completion"))


def _plain(obj: dict[str, Any]) -> Row:
    return {"text": _text(obj["text"], "text")}


#: key that identifies the shape -> normaliser. The first key present wins.
ROW_SHAPES: dict[str, Callable[[dict[str, Any]], Row]] = {
    "messages": _chat,
    "instruction": _alpaca,
    "prompt": _prompt_completion,
    "text": _plain,
}


def normalize(obj: Any) -> Row:
    """One parsed JSON value -> a trainer row, or BadRow saying what is wrong."""
    if not isinstance(obj, dict):
        raise BadRow(f"expected a JSON object, got {type(obj).__name__}")
    for key, fn in ROW_SHAPES.items():
        if key in obj:
            return fn(obj)
    raise BadRow(f"unknown row shape (keys: {', '.join(sorted(obj)) or 'none'}); expected one of "
                 "'messages', 'instruction'/'output', 'prompt'/'completion', 'text'")


def _pair(question: str, answer: str) -> Row:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


# ---- files ---------------------------------------------------------------------------
#
# Text must be UTF-8. A file in another encoding (Latin-1, UTF-16) or a binary file is not
# guessed at: decoding with errors="replace" would train on mojibake. Undecodable lines are
# bad rows with their file and line; a file that is not text at all is one bad row.

_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


class NotText(BadRow):
    """The whole file is not UTF-8 text (binary, UTF-16): reported once, as its line 1."""


def _binary_reason(head: bytes) -> str | None:
    """Why a file is not UTF-8 text at all, judged from its first bytes; None if it may be."""
    if head.startswith(_UTF16_BOMS):
        return "the file is UTF-16 text; save it as UTF-8"
    if b"\x00" in head:
        return "the file is binary (it contains NUL bytes), not UTF-8 text"
    return None


def _decode(raw: bytes) -> str:
    """One line as UTF-8; BadRow naming the column of the first undecodable byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = raw[exc.start:exc.start + 1].hex()
        raise BadRow(f"not UTF-8 text (byte 0x{byte} at column {exc.start + 1}); save the file as UTF-8") from None


def _text_lines(path: Path) -> Iterator[tuple[int, str | BadRow]]:
    """(line number, text or BadRow) for every line; one BadRow for a file that is not text."""
    with path.open("rb") as fh:
        reason = _binary_reason(fh.read(8192))
        if reason:
            yield 1, NotText(reason)
            return
        fh.seek(0)
        for n, raw in enumerate(fh, 1):
            if n == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
            try:
                yield n, _decode(raw)
            except BadRow as exc:
                yield n, exc


def _json_lines(path: Path) -> Iterator[tuple[int, Row | BadRow]]:
    for n, line in _text_lines(path):
        if isinstance(line, BadRow):
            yield n, line
            continue
        if not line.strip():
            continue
        try:
            yield n, normalize(json.loads(line))
        except json.JSONDecodeError as exc:
            yield n, BadRow(f"invalid JSON ({exc.msg} at column {exc.colno})")
        except BadRow as exc:
            yield n, exc


def _json_file(path: Path) -> Iterator[tuple[int, Row | BadRow]]:
    lines = list(_text_lines(path))
    bad = [(n, line) for n, line in lines if isinstance(line, BadRow)]
    if bad:  # one undecodable byte spoils a whole JSON document; report where it is
        yield from bad
        return
    text = "".join(line for _, line in lines if isinstance(line, str))
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        yield from _json_lines(path)  # a .json file holding JSON lines
        return
    items = data if isinstance(data, list) else [data]
    for n, obj in enumerate(items, 1):  # "line" = item number in the array
        try:
            yield n, normalize(obj)
        except BadRow as exc:
            yield n, exc


def _text_blocks(path: Path) -> Iterator[tuple[int, Row | BadRow]]:
    """Blank-line separated blocks; a block with an undecodable line is skipped as a whole."""
    block: list[str] = []
    start, broken = 0, None
    for n, line in [*_text_lines(path), (-1, "")]:
        if isinstance(line, NotText):
            yield n, line
            return
        if isinstance(line, BadRow) or line.strip():
            if not block and broken is None:
                start = n
            if isinstance(line, BadRow):
                broken = broken or (n, line)
            else:
                block.append(line.rstrip())
        elif block or broken:
            if broken:
                yield broken
            else:
                yield start, {"text": "\n".join(block)}
            block, broken = [], None


_READERS: dict[str, Callable[[Path], Iterator[tuple[int, Row | BadRow]]]] = {
    ".jsonl": _json_lines,
    ".json": _json_file,
    ".txt": _text_blocks,
}


def is_eval_file(path: Path) -> bool:
    return path.name.lower().startswith("eval")


def data_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                  and not p.name.startswith("."))


@dataclass
class DomainData:
    """Good rows of both splits, the bad rows skipped, and where they came from."""

    folder: str
    train: list[Row] = field(default_factory=list)
    eval: list[Row] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    eval_from_train: bool = False  # no eval* file: a fixed slice of train was held out

    def bad_summary(self, limit: int = 5) -> str:
        """'skipped 3 bad rows: train.jsonl:4 invalid JSON ...; ...' or ''."""
        if not self.bad:
            return ""
        shown = "; ".join(str(b) for b in self.bad[:limit])
        more = f"; and {len(self.bad) - limit} more" if len(self.bad) > limit else ""
        return f"skipped {len(self.bad)} bad row{'s' * (len(self.bad) != 1)}: {shown}{more}"

    def datasets(self) -> tuple[Any, Any]:
        """(train, eval) as `datasets.Dataset`s, held in memory (no cache files)."""
        from datasets import Dataset

        return Dataset.from_list([_columns(r) for r in self.train]), Dataset.from_list(
            [_columns(r) for r in self.eval])


def _columns(row: Row) -> dict[str, Any]:
    # one schema for both kinds so they can share a Dataset
    return {"messages": row.get("messages") or [], "text": row.get("text") or ""}


def read_file(path: Path) -> tuple[list[Row], list[BadRow]]:
    rows, bad = [], []
    for line, item in _READERS[path.suffix.lower()](path):
        if isinstance(item, BadRow):
            item.file, item.line = path.name, line
            bad.append(item)
        else:
            rows.append(item)
    return rows, bad


def load_domain_data(folder: Path | str, *, holdout: float = 0.1) -> DomainData:
    """Read every data file of a domain; NoTrainingData if no usable training row remains."""
    folder = Path(folder)
    out = DomainData(folder=str(folder))
    for path in data_files(folder):
        rows, bad = read_file(path)
        out.files.append(path.name)
        out.bad.extend(bad)
        (out.eval if is_eval_file(path) else out.train).extend(rows)
    for b in out.bad:
        log.warning("%s: skipped bad row %s", folder, b)
    if not out.train:
        found = ", ".join(out.files) or "no .jsonl/.json/.txt files"
        detail = f"; {out.bad_summary()}" if out.bad else ""
        raise NoTrainingData(f"no usable training rows in {folder} ({found}){detail}")
    if not out.eval:
        _hold_out(out, holdout)
    return out


def _hold_out(data: DomainData, fraction: float) -> None:
    """No eval* file: move a fixed (content-hashed, so stable) slice of train to eval."""
    if len(data.train) < 2:
        data.eval = list(data.train)  # one row: evaluate on it rather than on nothing
        data.eval_from_train = True
        return
    keyed = sorted(data.train, key=lambda r: hashlib.sha1(_row_key(r).encode()).hexdigest())
    n = max(1, int(len(keyed) * fraction))
    held = {id(r) for r in keyed[:n]}
    data.eval = [r for r in data.train if id(r) in held]
    data.train = [r for r in data.train if id(r) not in held]
    data.eval_from_train = True
    log.info("%s has no eval* file; held out %d of %d rows for evaluation", data.folder, n,
             n + len(data.train))


def load_hub_data(dataset_id: str, *, holdout: float = 0.1) -> DomainData:
    """A hub data set (needs network): its train split, and test/validation as eval."""
    from datasets import load_dataset

    splits = load_dataset(dataset_id)
    out = DomainData(folder=dataset_id, files=list(splits))
    for split, target in (("train", out.train), ("validation", out.eval), ("test", out.eval)):
        if split not in splits or (split == "test" and out.eval):
            continue
        for n, obj in enumerate(splits[split], 1):
            try:
                target.append(normalize(dict(obj)))
            except BadRow as exc:
                exc.file, exc.line = f"{dataset_id}[{split}]", n
                out.bad.append(exc)
    if not out.train:
        raise NoTrainingData(f"hub data set {dataset_id!r} has no usable rows in its train split")
    if not out.eval:
        _hold_out(out, holdout)
    return out


# ---- de-duplication (feedback export) ---------------------------------------------------

_SPACE = re.compile(r"\s+")


def _norm(text: str) -> str:
    return _SPACE.sub(" ", text).strip().casefold()


def _row_key(row: Row) -> str:
    if row.get("text"):
        return _norm(row["text"])
    return "\x1f".join(f"{m['role']}:{_norm(m['content'])}" for m in row["messages"] if m["role"] != "system")


def question_of(row: Row) -> str | None:
    """The first user turn, normalised; None for plain text."""
    return next((_norm(m["content"]) for m in row.get("messages") or () if m["role"] == "user"), None)


def feedback_rows(pairs: Iterable[tuple[str, str]], train: Iterable[Row], eval_rows: Iterable[Row]) -> list[Row]:
    """(question, answer) pairs -> new chat rows: not already in train, not an eval question.

    An eval question is refused so exported feedback never leaks the held-out split into
    training (which would make the evaluation gate meaningless).
    """
    seen = {_row_key(r) for r in train}
    eval_questions = {q for q in map(question_of, eval_rows) if q}
    out = []
    for question, answer in pairs:
        if not (question or "").strip() or not (answer or "").strip():
            continue
        row = _pair(question.strip(), answer.strip())
        key = _row_key(row)
        if key in seen or question_of(row) in eval_questions:
            continue
        seen.add(key)
        out.append(row)
    return out
