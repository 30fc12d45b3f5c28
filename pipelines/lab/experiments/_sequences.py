"""Token rows for the experiments on causal LMs, with the lab's CharTokenizer or a transformers tokenizer."""

from __future__ import annotations

from typing import Any

import torch

from pipelines.lab.data import CharTokenizer


def special_id(tokenizer: Any, name: str) -> int | None:
    """The id of the tokenizer's `name` token ("pad", "bos", "eos"): transformers' `<name>_token_id` or the
    CharTokenizer's `<name>_id`; None if it has none."""
    for attribute in (f"{name}_token_id", f"{name}_id"):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """`text` as ids without any special token."""
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.encode(text, bos=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def labelled_rows(rows: list[list[int]], starts: list[int], pad: int) -> tuple[torch.Tensor, ...]:
    """Right-padded `ids`, the attention `mask`, and `labels`: the ids from each row's start on, -100 before it
    and on the padding (the loss covers what follows the prompt)."""
    ids = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    for i, start in enumerate(starts):
        labels[i, :start] = -100
    return ids, mask, labels
