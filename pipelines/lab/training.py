"""A small deterministic training loop for the lab, and the scores its experiments report.

`fit` trains the parameters it is given with AdamW on minibatches drawn by a seeded generator, so the same
seed gives the same weights bit for bit; it reports to a `Progress` every step, which is also where a cancel
request stops it. `accuracy` and `evaluate_lm` score classifiers and the causal LM.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.lab.experiment import Progress


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator inside (adapters and heads draw their initial weights from it) and give
    the caller's generator state back afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def classification_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Cross-entropy of a classifier (`model(inputs, attention_mask)`) on a LabData batch."""
    return F.cross_entropy(model(batch.inputs, batch.attention_mask), batch.labels)


def lm_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The causal LM's loss on the answer tokens of an LMTask batch."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss


def _draw(data: Any, batch_size: int, generator: torch.Generator) -> Iterator[Any]:
    """Minibatches of a data set (anything with len() and take(index)) in a seeded order, epoch after epoch."""
    if callable(data) and not hasattr(data, "take"):
        while True:
            yield data(generator)
    n = len(data)
    if n == 0:
        raise ValueError("cannot train on an empty data set")
    size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - size + 1, size):
            yield data.take(order[start:start + size])


def fit(model: nn.Module, params: Iterable[nn.Parameter], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        batches: Any, steps: int, lr: float, progress: Progress | None = None, *, batch_size: int = 32,
        weight_decay: float = 0.0, max_grad_norm: float | None = 1.0, seed: int = 0, message: str = "training",
        on_step: Callable[[int, float], None] | None = None,
        optimizer: torch.optim.Optimizer | None = None) -> list[float]:
    """Train `params` (and only them) for `steps` AdamW steps; return the loss of every step.

    `batches` is a data set (`LabData`, `LMTask`: anything with `len()` and `take(index)`) drawn in a seeded
    shuffled order, or a function `batches(generator) -> batch`. `loss_fn(model, batch)` returns the loss.
    `progress` gets a report every step (its cancel request raises `LabCancelled` there); `on_step(step, loss)`
    is called after each step (1-based), for methods that act between steps (a proximal update, a schedule).
    `optimizer` replaces the AdamW made here, for a method that reads its state between steps.
    The model's train/eval mode is restored afterwards.
    """
    params = list(params)
    if not params:
        raise ValueError("fit was given no parameters to train")
    for p in params:
        p.requires_grad_(True)
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    draw = _draw(batches, batch_size, torch.Generator().manual_seed(seed))
    was_training = model.training
    model.train()
    losses: list[float] = []
    try:
        for step in range(1, steps + 1):
            if progress is not None:
                progress.update((step - 1) / steps, f"{message}: step {step}/{steps}")
            loss = loss_fn(model, next(draw))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
    finally:
        model.train(was_training)
    if progress is not None:
        progress.update(1.0, f"{message}: done")
    return losses


@torch.no_grad()
def predictions(model: nn.Module, data: Any, batch_size: int = 512) -> torch.Tensor:
    """The class a classifier picks for every example of a LabData."""
    was_training = model.training
    model.eval()
    try:
        out = [model(part.inputs, part.attention_mask).argmax(-1)
               for part in (data.take(slice(i, i + batch_size)) for i in range(0, len(data), batch_size))]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, data: Any, batch_size: int = 512) -> float:
    """The fraction of examples of a LabData the classifier gets right."""
    if len(data) == 0:
        raise ValueError("cannot score an empty data set")
    return float((predictions(model, data, batch_size) == data.labels).float().mean())


@torch.no_grad()
def evaluate_lm(model: nn.Module, task: Any, batch_size: int = 256) -> dict[str, float]:
    """A causal LM on an LMTask's answers: `loss` (mean cross-entropy per answer token), `token_accuracy`
    (greedy next-token hits given the true prefix) and `exact_match` (the share of answers all of whose tokens
    are hit: exactly the answers greedy decoding would produce)."""
    was_training = model.training
    model.eval()
    total_loss, hits, tokens, exact = 0.0, 0, 0, 0
    try:
        for i in range(0, len(task), batch_size):
            part = task.take(slice(i, i + batch_size))
            logits = model(input_ids=part.input_ids, attention_mask=part.attention_mask).logits[:, :-1]
            target = part.labels[:, 1:]
            scored = target != -100
            total_loss += float(F.cross_entropy(logits[scored], target[scored], reduction="sum"))
            right = (logits.argmax(-1) == target) | ~scored
            hits += int((right & scored).sum())
            tokens += int(scored.sum())
            exact += int(right.all(dim=1).sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("the task has no answer tokens to score")
    return {"loss": total_loss / tokens, "token_accuracy": hits / tokens, "exact_match": exact / len(task)}
