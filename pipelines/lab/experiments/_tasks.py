"""The multi-task character data the routing methods' experiments share (MixLoRA, SMoRA, X-LoRA): the causal LM's
tasks mixed in one training set, a test set per task, and scores per task.

Sequences of every task are padded together, so one batch mixes tasks. With a Hub model the same prompts and
answers are tokenised by the model's own tokenizer.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from matplotlib.figure import Figure
from torch import nn

from pipelines.lab.data import LM_TASKS, CharTokenizer, LMTask, lm_examples, lm_task
from pipelines.lab.experiment import LabSettings, LabSettingsError
from pipelines.lab.models import load_backbone
from pipelines.lab.plots import bar_plot
from pipelines.lab.training import evaluate_lm


@dataclass
class MultiTaskSettings(LabSettings):
    """The data and optimiser settings the multi-task experiments share."""

    tasks: tuple[str, ...] = field(default=LM_TASKS, metadata={
        "help": "the character tasks learnt together", "label": "Tasks", "choices": LM_TASKS})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate of the adapters",
                                                         "label": "Learning rate", "min": 1e-6, "max": 1.0})
    batch_size: int = field(default=32, metadata={"help": "sequences per step (tasks mixed)", "label": "Batch size",
                                                  "min": 1, "max": 1024})
    train_per_task: int = field(default=256, metadata={"help": "training examples of each task",
                                                       "label": "Training examples per task", "min": 8,
                                                       "max": 20000})
    test_per_task: int = field(default=128, metadata={"help": "held-out examples of each task",
                                                      "label": "Test examples per task", "min": 8, "max": 20000})

    def validate(self) -> None:
        super().validate()
        if len(set(self.tasks)) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise LabSettingsError("tasks must name two or more different tasks")


class HubTokenizer:
    """A transformers tokenizer behind the two calls `lm_examples` makes of the lab's `CharTokenizer`."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        head = [self.tokenizer.bos_token_id] if bos and self.tokenizer.bos_token_id is not None else []
        tail = [self.tokenizer.eos_token_id] if eos and self.tokenizer.eos_token_id is not None else []
        return head + ids + tail

    def decode(self, ids, *, skip_special: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
        return ids, mask


def language_model(model_id: str = "") -> tuple[nn.Module, CharTokenizer | HubTokenizer]:
    """The tiny causal LM (or the Hub model `model_id`) and a tokenizer `lm_examples` can use."""
    model, tokenizer = load_backbone("causal_lm", model_id)
    return model, tokenizer if isinstance(tokenizer, CharTokenizer) else HubTokenizer(tokenizer)


def task_pairs(name: str, split: str, n: int, seed: int) -> list[tuple[str, str]]:
    task = lm_task(name, split, n=n, seed=seed)
    return list(zip(task.prompts, task.answers, strict=True))


def mixed_tasks(tasks: Sequence[str], split: str, n_per_task: int, seed: int, tokenizer=None) -> LMTask:
    """`n_per_task` examples of each task in one shuffled, jointly padded set."""
    pairs = [pair for name in tasks for pair in task_pairs(name, split, n_per_task, seed)]
    random.Random(f"mixed:{split}:{seed}").shuffle(pairs)
    return lm_examples(pairs, "+".join(tasks), tokenizer)


def task_tests(tasks: Sequence[str], n: int, seed: int, tokenizer=None) -> dict[str, LMTask]:
    """A held-out test set per task."""
    return {name: lm_examples(task_pairs(name, "test", n, seed), name, tokenizer) for name in tasks}


def task_accuracies(model: nn.Module, tests: dict[str, LMTask]) -> dict[str, float]:
    """{task: token accuracy on its answers} (greedy next-token hits given the true prefix)."""
    return {name: evaluate_lm(model, test)["token_accuracy"] for name, test in tests.items()}


def spread(loads: torch.Tensor) -> float:
    """How uneven a load vector is: its coefficient of variation (0 when every entry is the same)."""
    return float(loads.std(unbiased=False) / loads.mean())


def trailing_mean(values: list[float], window: int = 10) -> list[float]:
    """A trailing mean over `window` steps, so a per-batch curve shows its trend."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def segmented(tasks: Sequence[str], split: str, n: int, seed: int, tokenizer=None, *, per_sequence: int = 2,
              min_len: int = 3, max_len: int = 6) -> tuple[LMTask, torch.Tensor]:
    """`n` sequences that each hold `per_sequence` examples of different tasks one after the other (one
    beginning-of-sequence token, an end-of-sequence token after each answer; the loss covers every answer), and
    the task index of each token (-1 for the opening token and padding)."""
    tokenizer = tokenizer or CharTokenizer()
    rng = random.Random(f"segments:{split}:{seed}")
    pools = {}
    for name in tasks:
        examples = lm_task(name, split, n=n * per_sequence, min_len=min_len, max_len=max_len, seed=seed)
        pools[name] = iter(zip(examples.prompts, examples.answers, strict=True))
    rows, labels, owners, texts = [], [], [], []
    for _ in range(n):
        ids = tokenizer.encode("", bos=True)
        answer, owner, text = [False] * len(ids), [-1] * len(ids), []
        for name in rng.sample(list(tasks), per_sequence):
            prompt, reply = next(pools[name])
            head, tail = tokenizer.encode(prompt, bos=False), tokenizer.encode(reply, bos=False, eos=True)
            ids += head + tail
            answer += [False] * len(head) + [True] * len(tail)
            owner += [list(tasks).index(name)] * (len(head) + len(tail))
            text.append(prompt + reply)
        rows.append(ids)
        labels.append(answer)
        owners.append(owner)
        texts.append(" ".join(text))
    input_ids, mask = tokenizer.pad(rows)
    width = input_ids.shape[1]
    answer_mask = torch.tensor([a + [False] * (width - len(a)) for a in labels])
    owner_ids = torch.tensor([o + [-1] * (width - len(o)) for o in owners])
    task = LMTask("segments", tuple(texts), tuple("" for _ in texts), input_ids, mask,
                  input_ids.masked_fill(~answer_mask, -100))
    return task, owner_ids


def accuracy_report(labels: dict[str, str], accuracy: dict[str, dict[str, float]], tasks: Sequence[str]
                    ) -> tuple[dict[str, float], list[dict], Figure]:
    """For variants {key: label} and their {key: {task: token accuracy}}: the metrics `accuracy_<key>_<task>` and
    `mean_accuracy_<key>`, one table row per variant, and the grouped bar plot of accuracy per task."""
    metrics: dict[str, float] = {}
    rows = []
    for key, label in labels.items():
        for task in tasks:
            metrics[f"accuracy_{key}_{task}"] = accuracy[key][task]
        metrics[f"mean_accuracy_{key}"] = sum(accuracy[key][t] for t in tasks) / len(tasks)
        rows.append({"variant": label, "mean token accuracy": round(metrics[f"mean_accuracy_{key}"], 4),
                     **{task: round(accuracy[key][task], 4) for task in tasks}})
    figure = bar_plot(list(tasks), {label: [accuracy[key][t] for t in tasks] for key, label in labels.items()},
                      title="Token accuracy per task", xlabel="task", ylabel="token accuracy", annotate=False)
    return metrics, rows, figure
