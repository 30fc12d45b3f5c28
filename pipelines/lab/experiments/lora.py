"""LoRA's rank sweep: how accuracy and trainable parameters grow with the rank r of the update B A.

A pre-trained tiny encoder learns a new text classification task with LoRA on its attention projections (and a
new linear head), once per rank, each from the same starting point. Beside the sweep: the untrained adapter
(LoRA starts at identity, so this is the frozen encoder with an untrained head) and the head alone on the
frozen encoder. Hu et al. (2022) found that a small rank already reaches most of the accuracy; the figures show
where this task saturates, and the parameters grow linearly with the rank. The best adapter is finally merged
into the weights, which must leave its outputs unchanged.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from pipelines.adapters import LoRAConfig, add_adapter, count_parameters, merge, trainable_parameters, unmerge
from pipelines.lab import Experiment, LabResult, LabSettings, LabSettingsError, Progress, register_experiment
from pipelines.lab.data import TOKEN_TASKS, token_classification_task
from pipelines.lab.models import TextClassifier, attention_targets, load_backbone, mlp_targets
from pipelines.lab.plots import line_plot
from pipelines.lab.training import accuracy, classification_loss, fit, seeded

TARGETS = ("query-value", "all-attention", "attention-mlp")


@dataclass
class LoRASweepSettings(LabSettings):
    task: str = field(default="contains-pattern", metadata={
        "help": "the text classification task to learn (contains-pattern needs word order, so attention)",
        "label": "Task", "choices": TOKEN_TASKS})
    ranks: tuple[int, ...] = field(default=(1, 2, 4, 8, 16), metadata={
        "help": "the ranks to train, one adapter each", "label": "Ranks", "min": 1, "max": 64})
    alpha: float = field(default=8.0, metadata={
        "help": "the update is scaled by alpha / rank (PEFT's lora_alpha), so the rank can change without "
                "retuning the learning rate", "label": "Alpha", "min": 0.01, "max": 1024})
    targets: str = field(default="query-value", metadata={
        "help": "which layers get an adapter: the query and value projections (the paper's choice), all four "
                "attention projections, or those and the feed-forward layers", "label": "Adapted layers",
        "choices": TARGETS})
    steps: int = field(default=150, metadata={"help": "training steps per adapter", "label": "Steps",
                                              "min": 1, "max": 5000})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate", "label": "Learning rate",
                                                         "min": 1e-6, "max": 1.0})
    batch_size: int = field(default=32, metadata={"help": "examples per step", "label": "Batch size",
                                                  "min": 1, "max": 1024})
    train_examples: int = field(default=512, metadata={"help": "training sequences", "label": "Training examples",
                                                       "min": 16, "max": 20000})
    test_examples: int = field(default=512, metadata={"help": "held-out sequences the accuracy is measured on",
                                                      "label": "Test examples", "min": 16, "max": 20000})

    @classmethod
    def quick(cls) -> LoRASweepSettings:
        return cls(ranks=(1, 4), steps=60, train_examples=256, test_examples=256)

    def validate(self) -> None:
        super().validate()
        if len(set(self.ranks)) != len(self.ranks):
            raise LabSettingsError(f"ranks must not repeat a rank, not {', '.join(map(str, self.ranks))}")


def _targets(encoder: torch.nn.Module, which: str) -> list[str]:
    if which == "query-value":
        return attention_targets(encoder, ("q", "v"))
    if which == "all-attention":
        return attention_targets(encoder, ("q", "k", "v", "o"))
    return attention_targets(encoder, ("q", "k", "v", "o")) + mlp_targets(encoder)


def run(settings: LoRASweepSettings, progress: Progress) -> LabResult:
    progress.update(0.0, "loading the encoder and the task")
    encoder = load_backbone("encoder", settings.model_id)
    train = token_classification_task(settings.task, "train", n=settings.train_examples, seed=settings.seed)
    test = token_classification_task(settings.task, "test", n=settings.test_examples, seed=settings.seed)
    targets = _targets(encoder, settings.targets)
    runs = [0, *sorted(settings.ranks)]  # rank 0: the head alone on the frozen encoder
    rows, losses, trained = [], {}, {}

    def fresh_classifier() -> TextClassifier:
        # Every run starts from the same encoder copy and the same head, so only the adapter differs.
        with seeded(settings.seed):
            return TextClassifier(copy.deepcopy(encoder), test.num_labels)

    untrained = fresh_classifier()
    with seeded(settings.seed + 1):
        add_adapter(untrained.encoder, LoRAConfig(rank=max(runs), scale=settings.alpha / max(runs),
                                                  target_modules=targets))
    untrained_accuracy = accuracy(untrained, test)

    for i, rank in enumerate(runs):
        part = progress.span(0.02 + 0.96 * i / len(runs), 0.02 + 0.96 * (i + 1) / len(runs))
        label = "head only" if rank == 0 else f"rank {rank}"
        classifier = fresh_classifier()
        params = list(classifier.head.parameters())
        adapter_params = 0
        if rank:
            with seeded(settings.seed + 1):
                add_adapter(classifier.encoder, LoRAConfig(rank=rank, scale=settings.alpha / rank,
                                                           target_modules=targets))
            params = trainable_parameters(classifier.encoder) + params
            adapter_params = count_parameters(classifier.encoder)
        else:
            classifier.encoder.requires_grad_(False)
        started = time.perf_counter()
        curve = fit(classifier, params, classification_loss, train, settings.steps, settings.learning_rate, part,
                    batch_size=settings.batch_size, seed=settings.seed, message=f"training {label}")
        losses[label] = curve
        trained[rank] = classifier
        rows.append({"rank": rank, "adapter parameters": adapter_params,
                     "head parameters": sum(p.numel() for p in classifier.head.parameters()),
                     "test accuracy": round(accuracy(classifier, test), 4), "final loss": round(curve[-1], 4),
                     "seconds": round(time.perf_counter() - started, 2)})

    progress.update(0.98, "merging the best adapter into the weights")
    sweep = [r for r in rows if r["rank"]]
    best = max(sweep, key=lambda r: (r["test accuracy"], -r["rank"]))
    merge_difference = _merge_difference(trained[best["rank"]], test)
    head_only = rows[0]["test accuracy"]
    ranks = [r["rank"] for r in sweep]
    metrics = {"untrained_accuracy": untrained_accuracy, "head_only_accuracy": head_only,
               "best_accuracy": best["test accuracy"], "best_rank": float(best["rank"]),
               "merge_max_difference": merge_difference}
    for r in sweep:
        metrics[f"accuracy_rank_{r['rank']}"] = r["test accuracy"]
        metrics[f"parameters_rank_{r['rank']}"] = float(r["adapter parameters"])

    figures = {
        "accuracy_vs_rank": line_plot(
            {"LoRA": (ranks, [r["test accuracy"] for r in sweep])}, logx=True, ylim=(0.0, 1.02),
            hlines={"head only (frozen encoder)": head_only, "untrained adapter": untrained_accuracy},
            title=f"Test accuracy against LoRA rank ({settings.task})", xlabel="rank r", ylabel="test accuracy"),
        "parameters_vs_rank": line_plot(
            {"adapter parameters": (ranks, [r["adapter parameters"] for r in sweep])}, logx=True,
            title=f"Trainable adapter parameters against rank ({settings.targets})",
            xlabel="rank r", ylabel="parameters"),
        "training_loss": line_plot(
            dict(losses), title="Training loss per step", xlabel="step", ylabel="cross-entropy", logy=True,
            markers=False),
    }
    summary = (
        f"On **{settings.task}**, the untrained adapter scores {untrained_accuracy:.1%} and training the head "
        f"alone on the frozen encoder {head_only:.1%}. LoRA on {', '.join(targets)} reaches "
        + ", ".join(f"{r['test accuracy']:.1%} at rank {r['rank']}" for r in sweep)
        + f"; the best, rank {best['rank']}, trains {best['adapter parameters']:,} adapter parameters "
        f"(the encoder has {sum(p.numel() for p in encoder.parameters()):,}). Merged into the weights it changes "
        f"the logits by at most {merge_difference:.1e}."
    )
    return LabResult(method="lora", summary=summary, metrics=metrics,
                     tables={"sweep": rows, "baselines": [
                         {"model": "untrained adapter", "test accuracy": round(untrained_accuracy, 4)},
                         {"model": "head only", "test accuracy": head_only}]},
                     figures=figures, settings=settings.to_dict())


@torch.no_grad()
def _merge_difference(classifier: TextClassifier, test) -> float:
    """The largest change of any logit when the adapter is merged into the weights (LoRA is mergeable)."""
    classifier.eval()
    before = classifier(test.inputs, test.attention_mask)
    merge(classifier.encoder)
    after = classifier(test.inputs, test.attention_mask)
    unmerge(classifier.encoder)
    return float((after - before).abs().max())


register_experiment(Experiment(
    method="lora", settings_cls=LoRASweepSettings, run=run,
    description="Trains one LoRA per rank on a tiny pre-trained text encoder for a new classification task, "
                "beside the head alone and the untrained adapter. Look at where accuracy stops rising with the "
                "rank while the trainable parameters keep growing linearly.",
))
