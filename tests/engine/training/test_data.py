"""Loading a domain's data files: shapes, splits, bad rows, feedback de-duplication. No model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.errors import NoTrainingData
from engine.training.data import feedback_rows, load_domain_data, normalize

from .conftest import chat, write_jsonl

Q, A = "What is a lease?", "A contract that lets a tenant use property for a time in exchange for rent."

SHAPES = [
    ("chat", chat(Q, A), [("user", Q), ("assistant", A)]),
    ("chat with system", {"messages": [{"role": "system", "content": "Be brief."}, *chat(Q, A)["messages"]]},
     [("system", "Be brief."), ("user", Q), ("assistant", A)]),
    ("chat, trailing user turn dropped", {"messages": [*chat(Q, A)["messages"], {"role": "user", "content": "And?"}]},
     [("user", Q), ("assistant", A)]),
    ("alpaca", {"instruction": Q, "input": "", "output": A}, [("user", Q), ("assistant", A)]),
    ("alpaca with input", {"instruction": "Define:", "input": "lease", "output": A},
     [("user", "Define:\n\nlease"), ("assistant", A)]),
    ("prompt/completion", {"prompt": Q, "completion": A}, [("user", Q), ("assistant", A)]),
]


@pytest.mark.parametrize("name,obj,expected", SHAPES, ids=[s[0] for s in SHAPES])
def test_accepted_shapes_become_chat_rows(name: str, obj: dict, expected: list[tuple[str, str]]) -> None:
    row = normalize(obj)
    assert [(m["role"], m["content"]) for m in row["messages"]] == expected


BAD = [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"foo": 1}', "unknown row shape"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}', "is empty"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "needs a role"),
    ('{"instruction": "q", "output": 5}', "must be a string"),
]


def test_bad_rows_are_skipped_and_reported_with_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    good = [chat(f"question {i}?", f"answer {i}.") for i in range(3)]
    write_jsonl(data / "train.jsonl", [good[0], *[b for b, _ in BAD], "", good[1], good[2]])
    write_jsonl(data / "eval.jsonl", [chat("held out?", "yes.")])

    loaded = load_domain_data(data)

    assert [r["messages"][0]["content"] for r in loaded.train] == ["question 0?", "question 1?", "question 2?"]
    assert [(b.file, b.line) for b in loaded.bad] == [("train.jsonl", n) for n in range(2, 2 + len(BAD))]
    for bad, (_, reason) in zip(loaded.bad, BAD):
        assert reason in bad.reason
    summary = loaded.bad_summary(limit=2)
    assert summary.startswith(f"skipped {len(BAD)} bad rows: train.jsonl:2: invalid JSON")
    assert f"and {len(BAD) - 2} more" in summary


def _line(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"


GOOD = chat("Was ist ein Mietvertrag?", "Ein Vertrag über die Nutzung einer Wohnung gegen Miete.")
LATIN1 = json.dumps(chat("Qu'est-ce qu'un bail à loyer?", "Un contrat de location, réglé chaque mois."),
                    ensure_ascii=False)

UNDECODABLE = [
    # (id, file name, bytes, [(line, words)] of the bad rows, good rows read)
    ("latin-1 jsonl row", "train.jsonl", _line(GOOD) + LATIN1.encode("latin-1") + b"\n" + _line(GOOD),
     [(2, "not UTF-8 text (byte 0x")], 2),
    ("binary txt", "notes.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)),
     [(1, "binary")], 0),
    ("utf-16 jsonl", "extra.jsonl", LATIN1.encode("utf-16"), [(1, "UTF-16")], 0),
    ("latin-1 json document", "more.json", b'[\n' + LATIN1.encode("latin-1") + b'\n]\n',
     [(2, "not UTF-8 text")], 0),
    ("latin-1 line in a txt block", "notes.txt",
     "A block in good UTF-8: Größe.\n\nAnother block,\nwith a bad caf".encode() + b"\xe9 line.\n\nThe last block.\n",
     [(4, "byte 0xe9 at column 15")], 2),
]


@pytest.mark.parametrize("case, name, raw, bad, good", UNDECODABLE, ids=[c[0] for c in UNDECODABLE])
def test_undecodable_text_is_reported_with_file_and_line_and_never_trained_as_mojibake(
    tmp_path: Path, case: str, name: str, raw: bytes, bad: list[tuple[int, str]], good: int
) -> None:
    data = tmp_path / "data"
    write_jsonl(data / "eval.jsonl", [chat("held out?", "yes.")])
    write_jsonl(data / "base.jsonl", [chat("Is this fine?", "Yes.")])
    (data / name).write_bytes(raw)

    loaded = load_domain_data(data)

    assert [(b.file, b.line) for b in loaded.bad] == [(name, line) for line, _ in bad]
    for b, (_, words) in zip(loaded.bad, bad):
        assert words in b.reason
    assert len(loaded.train) == 1 + good
    text = json.dumps(loaded.train, ensure_ascii=False)
    assert "\ufffd" not in text and "Ã" not in text  # no replacement characters, no mojibake
    assert f"{name}:{bad[0][0]}" in loaded.bad_summary()


def test_a_utf8_byte_order_mark_is_not_a_bad_row(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + _line(GOOD) + _line(GOOD))
    loaded = load_domain_data(data)
    assert loaded.bad == [] and len(loaded.train) + len(loaded.eval) == 2


def test_eval_files_are_the_held_out_split_and_every_other_file_trains(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [chat("a?", "A.")])
    write_jsonl(data / "feedback.jsonl", [chat("b?", "B.")])
    (data / "extra.json").write_text(json.dumps([{"instruction": "c?", "output": "C."}]), encoding="utf-8")
    (data / "notes.txt").write_text("First block\nstill first.\n\n\nSecond block.\n", encoding="utf-8")
    write_jsonl(data / "eval.jsonl", [chat("e?", "E.")])
    write_jsonl(data / "eval_extra.jsonl", [{"prompt": "f?", "completion": "F."}])
    (data / "README.md").write_text("not data", encoding="utf-8")

    loaded = load_domain_data(data)

    questions = sorted(r["messages"][0]["content"] for r in loaded.train if "messages" in r)
    assert questions == ["a?", "b?", "c?"]
    assert sorted(r["text"] for r in loaded.train if "text" in r) == ["First block\nstill first.", "Second block."]
    assert sorted(r["messages"][0]["content"] for r in loaded.eval) == ["e?", "f?"]
    assert not loaded.eval_from_train and not loaded.bad
    train_ds, eval_ds = loaded.datasets()
    assert (len(train_ds), len(eval_ds)) == (5, 2)


def test_without_eval_file_a_stable_slice_is_held_out(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [chat(f"q{i}?", f"a{i}.") for i in range(30)])

    first, second = load_domain_data(data), load_domain_data(data)

    assert first.eval_from_train and len(first.eval) == 3 and len(first.train) == 27
    assert first.eval == second.eval  # the same rows every time: comparable across versions
    held = {r["messages"][0]["content"] for r in first.eval}
    assert not held & {r["messages"][0]["content"] for r in first.train}


@pytest.mark.parametrize("files", [{}, {"train.jsonl": "{broken\n"}, {"eval.jsonl": json.dumps(chat("q", "a")) + "\n"}])
def test_no_usable_training_rows_names_the_folder(tmp_path: Path, files: dict[str, str]) -> None:
    data = tmp_path / "legal" / "data"
    data.mkdir(parents=True)
    for name, text in files.items():
        (data / name).write_text(text, encoding="utf-8")
    with pytest.raises(NoTrainingData, match=str(data)):
        load_domain_data(data)


def test_missing_folder_is_no_training_data(tmp_path: Path) -> None:
    with pytest.raises(NoTrainingData, match="no .jsonl/.json/.txt files"):
        load_domain_data(tmp_path / "nowhere")


def test_feedback_rows_skip_known_pairs_eval_questions_and_repeats() -> None:
    train = [chat("What is a lease?", "A rental contract."), {"text": "plain text row"}]
    evals = [chat("What is a deed?", "A document that transfers property.")]
    pairs = [
        ("what is a  LEASE?", "a rental contract."),        # same as train, modulo case and spaces
        ("What is a deed?", "Something else entirely."),   # an eval question: would leak the split
        ("What is a tort?", "A civil wrong."),
        ("What is a tort?", "A civil wrong."),             # repeated within the export
        ("What is a lease?", "A different answer."),       # same question, new answer: kept
        ("", "no question"),
    ]
    rows = feedback_rows(pairs, train, evals)
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows] == [
        ("What is a tort?", "A civil wrong."), ("What is a lease?", "A different answer.")]
