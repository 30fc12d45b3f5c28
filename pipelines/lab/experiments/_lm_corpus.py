"""Text like the tiny causal LM's pre-training corpus and its perplexity: the quantisation experiments (LQ-LoRA,
CBQ) measure how much of the model a quantiser keeps with it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.lab.data import LM_TASKS, CharTokenizer, lm_task, plain_text


@dataclass(frozen=True)
class Corpus:
    """Right-padded sequences `<bos>` text `<eos>` and their attention mask."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def take(self, index: Any) -> Corpus:
        """The sequences at `index` (for the lab's `fit`, which draws minibatches this way)."""
        return Corpus(self.input_ids[index], self.attention_mask[index])

    def batches(self, size: int) -> list[dict[str, torch.Tensor]]:
        """Consecutive batches of `size` sequences, as keyword arguments of a transformers model."""
        return [{"input_ids": self.input_ids[i:i + size], "attention_mask": self.attention_mask[i:i + size]}
                for i in range(0, len(self), size)]


def corpus(split: str, count: int, seed: int = 0, tokenizer: Any = None) -> Corpus:
    """`count` sequences in the pre-training mix: the four character tasks (prompt and answer) and templated
    sentences, in a seeded order; "train" and "test" draw different examples. `tokenizer` is the tiny model's
    `CharTokenizer` (the default) or a Hub model's tokenizer."""
    per_kind = math.ceil(count / (len(LM_TASKS) + 1))
    texts = [prompt + answer for name in LM_TASKS
             for prompt, answer in zip(*_pairs(name, split, per_kind, seed), strict=True)]
    texts += plain_text(per_kind, seed=seed if split == "train" else seed + 1000)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed + (split == "test")))
    chosen = [texts[i] for i in order.tolist()[:count]]
    if tokenizer is None or isinstance(tokenizer, CharTokenizer):
        tokenizer = tokenizer or CharTokenizer()
        return Corpus(*tokenizer.pad([tokenizer.encode(text, bos=True, eos=True) for text in chosen]))
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(chosen, padding=True, return_tensors="pt")
    return Corpus(encoded["input_ids"], encoded["attention_mask"])


def _pairs(name: str, split: str, n: int, seed: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    task = lm_task(name, split, n=n, min_len=2, max_len=6, seed=seed)
    return task.prompts, task.answers


def next_token_loss(model: nn.Module, batch: Corpus) -> torch.Tensor:
    """The causal LM's mean next-token cross-entropy over the real tokens of `batch` (a training loss)."""
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss


@torch.no_grad()
def perplexity(model: nn.Module, text: Corpus, batch_size: int = 128) -> float:
    """exp of the mean next-token cross-entropy over every real (not padding) token after the first."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for batch in text.batches(batch_size):
            logits = model(**batch).logits[:, :-1].float()
            target = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            tokens += int((target != -100).sum())
    finally:
        model.train(was_training)
    return math.exp(total / tokens)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a causal LM, in order: the ModuleList as long as its number of layers."""
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return list(module)
    raise ValueError(f"found no list of {depth} transformer blocks in {type(model).__name__}")
