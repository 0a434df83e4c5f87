"""Assistant-only labels on the real tokenizer's chat template (tokenizer files only, no weights)."""
from __future__ import annotations

import pytest

from engine.training.encoding import IGNORE, encode_row

from .conftest import REPO

MODEL_DIR = REPO / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def tokenizer():
    if not (MODEL_DIR / "tokenizer.json").is_file():
        pytest.fail("the default model is not converted yet (make model)")
    from engine.model import ModelSource, load_tokenizer

    return load_tokenizer(ModelSource("test", str(MODEL_DIR)))


def labelled_text(tokenizer, enc) -> str:
    return tokenizer.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE])


def test_only_assistant_turns_carry_labels(tokenizer) -> None:
    row = {"messages": [
        {"role": "system", "content": "You are a careful lawyer."},
        {"role": "user", "content": "What is a tort?"},
        {"role": "assistant", "content": "A civil wrong that causes harm."},
        {"role": "user", "content": "Example?"},
        {"role": "assistant", "content": "Negligence."},
    ]}
    enc = encode_row(tokenizer, row, 512)

    assert enc["input_ids"] == tokenizer(tokenizer.apply_chat_template(row["messages"], tokenize=False),
                                         add_special_tokens=False)["input_ids"]
    labelled = labelled_text(tokenizer, enc)
    assert labelled == "A civil wrong that causes harm.<|im_end|>\nNegligence.<|im_end|>\n"
    assert "lawyer" not in labelled and "tort" not in labelled and "assistant" not in labelled


def test_plain_text_learns_every_token_and_the_end(tokenizer) -> None:
    enc = encode_row(tokenizer, {"text": "Contracts need consideration."}, 512)
    assert enc["labels"] == enc["input_ids"]
    assert enc["input_ids"][-1] == tokenizer.eos_token_id


def test_truncation_keeps_ids_and_labels_aligned(tokenizer) -> None:
    row = {"messages": [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}]}
    enc = encode_row(tokenizer, row, 32)
    assert len(enc["input_ids"]) == len(enc["labels"]) == len(enc["attention_mask"]) == 32
    assert all(lab == IGNORE for lab in enc["labels"])  # the answer was cut off: nothing to learn
