"""Rows -> token ids and labels, with the loss on the assistant's tokens only.

The conversation is rendered with the tokenizer's own chat template (the one the engine
serves with), so the adapter learns exactly the format it will see. Labels are -100 on
everything the model should not learn to produce: the system prompt, the user's turns and
the role headers. An assistant turn's labels include its end-of-turn token, so the adapter
also learns where to stop. Plain-text rows are plain language modelling (every token).
"""
from __future__ import annotations

from typing import Any

IGNORE = -100


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant turn.

    A span runs from just after the generation prompt to the end of that turn as the
    template renders it (content + end-of-turn marker).
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = (
            tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if i else ""
        )
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise ValueError(
                "the tokenizer's chat template does not render a conversation as the concatenation "
                "of its turns; assistant-only labels cannot be located"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def encode_row(tokenizer: Any, row: dict[str, Any], max_len: int) -> dict[str, list[int]]:
    """input_ids / attention_mask / labels for one row, truncated to max_len tokens."""
    if row.get("messages"):
        text, spans = assistant_spans(tokenizer, row["messages"])
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [
            tok if any(start <= a < end for start, end in spans) else IGNORE
            for tok, (a, _b) in zip(ids, enc["offset_mapping"])
        ]
    else:
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        labels = list(ids)
    ids, labels = ids[:max_len], labels[:max_len]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def encode_dataset(tokenizer: Any, dataset: Any, max_len: int) -> tuple[Any, int]:
    """Tokenise a `datasets.Dataset` of rows; drops rows with nothing left to learn.

    Returns the encoded dataset and how many rows were dropped (every label cut off by
    max_len, which means the sequence limit is too small for that row).
    """

    def fn(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for messages, text in zip(batch["messages"], batch["text"]):
            enc = encode_row(tokenizer, {"messages": messages, "text": text}, max_len)
            for k in out:
                out[k].append(enc[k])
        return out

    encoded = dataset.map(fn, batched=True, remove_columns=dataset.column_names)
    kept = encoded.filter(lambda ex: any(t != IGNORE for t in ex["labels"]))
    return kept, len(encoded) - len(kept)


def collator(tokenizer: Any) -> Any:
    """Pads a batch: pad id for inputs, 0 for the mask, -100 for labels."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE, return_tensors="pt")
