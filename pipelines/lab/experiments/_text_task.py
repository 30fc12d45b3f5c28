"""What the rank experiments (DyLoRA, SoRA) share: a new text classification task on the tiny pre-trained
encoder, their common settings, and runs that all start from the same encoder, head and adapter initialisation.
"""

from __future__ import annotations

import copy
import time
from dataclasses import field
from typing import Any

from torch import nn

from pipelines.adapters import add_adapter
from pipelines.lab import LabSettings, Progress
from pipelines.lab.data import TOKEN_TASKS, token_classification_task
from pipelines.lab.models import TextClassifier, attention_targets, load_backbone
from pipelines.lab.training import classification_loss, fit, seeded

ADAPTER = "task"


def task_field() -> Any:
    return field(default="contains-pattern", metadata={
        "help": "the text classification task to learn (contains-pattern needs word order, so attention)",
        "label": "Task", "choices": TOKEN_TASKS})


def steps_field(default: int, note: str = "") -> Any:
    return field(default=default, metadata={"help": "training steps of every adapter" + note, "label": "Steps",
                                            "min": 2, "max": 5000})


def learning_rate_field(note: str = "") -> Any:
    return field(default=3e-3, metadata={"help": "AdamW learning rate" + note, "label": "Learning rate",
                                         "min": 1e-6, "max": 1.0})


def batch_size_field() -> Any:
    return field(default=32, metadata={"help": "examples per step", "label": "Batch size", "min": 1, "max": 1024})


def examples_field(split: str) -> Any:
    what = "training sequences" if split == "train" else "held-out sequences the accuracy is measured on"
    return field(default=512, metadata={"help": what, "label": f"{split.capitalize()} examples",
                                        "min": 16, "max": 20000})


class TextTaskRuns:
    """The encoder, the task's splits, the query/value targets, and every run's loss curve and time."""

    def __init__(self, settings: LabSettings, progress: Progress) -> None:
        progress.update(0.0, "loading the encoder and the task")
        self.settings = settings
        self.encoder = load_backbone("encoder", settings.model_id)
        self.train = token_classification_task(settings.task, "train", n=settings.train_examples,
                                               seed=settings.seed)
        self.test = token_classification_task(settings.task, "test", n=settings.test_examples, seed=settings.seed)
        self.targets = attention_targets(self.encoder, ("q", "v"))
        self.losses: dict[str, list[float]] = {}
        self.seconds: dict[str, float] = {}

    def classifier_with(self, config) -> TextClassifier:
        """A fresh classifier (encoder copy, head) with adapter `ADAPTER` of `config`, the same for every run."""
        with seeded(self.settings.seed):
            classifier = TextClassifier(copy.deepcopy(self.encoder), self.test.num_labels)
        with seeded(self.settings.seed + 1):
            add_adapter(classifier.encoder, config, ADAPTER)
        return classifier

    def fit(self, part: Progress, classifier: TextClassifier, label: str, params: list[nn.Parameter],
            loss_fn=classification_loss, on_step=None) -> None:
        """Train `params` and the head on the task; the loss curve and seconds go under `label`."""
        settings = self.settings
        started = time.perf_counter()
        self.losses[label] = fit(classifier, params + list(classifier.head.parameters()), loss_fn, self.train,
                                 settings.steps, settings.learning_rate, part, batch_size=settings.batch_size,
                                 seed=settings.seed, message=f"training {label}", on_step=on_step)
        self.seconds[label] = round(time.perf_counter() - started, 2)

    def run_rows(self) -> list[dict]:
        return [{"run": label, "seconds": self.seconds[label], "final loss": round(curve[-1], 4)}
                for label, curve in self.losses.items()]
