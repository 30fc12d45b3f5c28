"""Block-LoRA against LoRA in few-shot learning: fewer trainable parameters, the same kind of accuracy.

Block-LoRA ("One Head Eight Arms", arXiv 2501.16720) builds on CLIP-LoRA, the few-shot recipe of LoRA on the
query, key and value projections at rank 2, and shares one down-projection block across every chunk of the input,
so each adapted layer trains d_out * r + r * d_in / n numbers instead of (d_out + d_in) * r. Here the tiny ViT,
pre-trained on upright digits, learns a shifted domain (rotated digits by default) from k labelled images per
class with a new linear head: the head alone, CLIP-LoRA (the Block-LoRA layer without sharing, so initialisation,
factor alpha / sqrt(r) and dropout are the same) and Block-LoRA, for each k. The last figure shows one learned
Block-LoRA update: its columns repeat every d_in / n, the tied blocks of its down-projection.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from pipelines.adapters import (
    BlockLoRAConfig,
    add_adapter,
    count_parameters,
    merge,
    trainable_parameters,
    unmerge,
)
from pipelines.lab import Experiment, LabResult, LabSettings, LabSettingsError, Progress, register_experiment
from pipelines.lab.data import SHIFTS, LabData, shifted_digits
from pipelines.lab.experiments._merging import merge_round_trip
from pipelines.lab.models import ImageClassifier, attention_targets, load_backbone
from pipelines.lab.plots import bar_plot, heatmap, line_plot
from pipelines.lab.training import accuracy, classification_loss, fit, seeded

METHODS = ("head only", "LoRA (CLIP-LoRA)", "Block-LoRA")


@dataclass
class BlockLoRASettings(LabSettings):
    shift: str = field(default="rotation", metadata={
        "help": "the new domain the few shots come from (the ViT was pre-trained on upright digits)",
        "label": "Target domain", "choices": SHIFTS})
    shots: tuple[int, ...] = field(default=(1, 4, 16), metadata={
        "help": "labelled training images per class, one run each", "label": "Shots per class",
        "min": 1, "max": 100})
    rank: int = field(default=2, metadata={"help": "rank of both adapters (CLIP-LoRA: 2)", "label": "Rank",
                                           "min": 1, "max": 64})
    num_blocks: int = field(default=8, metadata={
        "help": "n: the chunks of the input that share Block-LoRA's down-projection block", "label": "Blocks n",
        "min": 1, "max": 64})
    steps: int = field(default=100, metadata={"help": "training steps per run", "label": "Steps",
                                              "min": 1, "max": 5000})
    learning_rate: float = field(default=5e-3, metadata={"help": "AdamW learning rate", "label": "Learning rate",
                                                         "min": 1e-6, "max": 1.0})
    batch_size: int = field(default=32, metadata={"help": "images per step", "label": "Batch size",
                                                  "min": 1, "max": 1024})
    repeats: int = field(default=1, metadata={
        "help": "draws of the few shots (and seeds) per k; accuracies are averaged", "label": "Repeats",
        "min": 1, "max": 10})

    @classmethod
    def quick(cls) -> BlockLoRASettings:
        return cls(shots=(16,), steps=40)

    def validate(self) -> None:
        super().validate()
        if len(set(self.shots)) != len(self.shots):
            raise LabSettingsError(f"shots must not repeat a value, not {', '.join(map(str, self.shots))}")


def few_shots(data: LabData, k: int, seed: int) -> LabData:
    """The first `k` images of every class in a seeded shuffled order."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    picked = [order[data.labels[order] == label][:k] for label in range(data.num_labels)]
    return data.take(torch.cat(picked))


def _config(settings: BlockLoRASettings, method: str, targets: list[str]) -> BlockLoRAConfig:
    return BlockLoRAConfig(rank=settings.rank, num_blocks=settings.num_blocks, share_down=method == "Block-LoRA",
                           target_modules=targets)


def run(settings: BlockLoRASettings, progress: Progress) -> LabResult:
    progress.update(0.0, "loading the ViT and the digits")
    vit = load_backbone("vit", settings.model_id)
    train, test = shifted_digits("train", settings.shift, seed=settings.seed), shifted_digits(
        "test", settings.shift, seed=settings.seed)
    targets = attention_targets(vit, ("q", "k", "v"))
    scores: dict[str, dict[int, list[float]]] = {m: {k: [] for k in settings.shots} for m in METHODS}
    parameters: dict[str, int] = {}
    trained: dict[str, ImageClassifier] = {}
    runs = len(settings.shots) * settings.repeats * len(METHODS)
    done = 0
    for k in settings.shots:
        for repeat in range(settings.repeats):
            seed = settings.seed + 100 * repeat
            shots = few_shots(train, k, seed)
            for method in METHODS:
                with seeded(seed):
                    classifier = ImageClassifier(copy.deepcopy(vit), test.num_labels)
                    if method != "head only":
                        add_adapter(classifier.vit, _config(settings, method, targets), name="adapter")
                params = list(classifier.head.parameters())
                if method == "head only":
                    classifier.vit.requires_grad_(False)
                else:
                    params = trainable_parameters(classifier.vit, "adapter") + params
                    parameters[method] = count_parameters(classifier.vit, "adapter")
                fit(classifier, params, classification_loss, shots, settings.steps, settings.learning_rate,
                    progress.span(done / runs, (done + 1) / runs), batch_size=settings.batch_size, seed=seed,
                    message=f"{method}, {k} shots")
                done += 1
                scores[method][k].append(accuracy(classifier, test))
                trained[method] = classifier

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    progress.update(0.99, "checking the merge")
    block = trained["Block-LoRA"].eval()
    merge_difference, _ = merge_round_trip(block.vit, lambda: block(test.inputs))
    lora_params, block_params = parameters["LoRA (CLIP-LoRA)"], parameters["Block-LoRA"]
    head_params = sum(p.numel() for p in trained["head only"].head.parameters())
    rows, metrics = [], {"parameters_lora": float(lora_params), "parameters_block_lora": float(block_params),
                         "parameters_head": float(head_params), "merge_max_difference": merge_difference}
    keys = {"head only": "head", "LoRA (CLIP-LoRA)": "lora", "Block-LoRA": "block_lora"}
    for k in settings.shots:
        row = {"shots per class": k}
        for method in METHODS:
            score = mean(scores[method][k])
            row[method] = round(score, 4)
            metrics[f"accuracy_{keys[method]}_{k}"] = score
        rows.append(row)
    shots = list(settings.shots)
    figures = {
        "accuracy_vs_shots": line_plot(
            {m: (shots, [mean(scores[m][k]) for k in shots]) for m in METHODS}, logx=True, ylim=(0.0, 1.02),
            title=f"Few-shot accuracy on {settings.shift} digits", xlabel="labelled images per class",
            ylabel="test accuracy"),
        "trainable_parameters": bar_plot(
            ["LoRA (CLIP-LoRA)", "Block-LoRA", "head (both)"], [lora_params, block_params, head_params],
            title=f"Trainable parameters (rank {settings.rank}, n = {settings.num_blocks}, on "
                  f"{', '.join(targets)})", xlabel="", ylabel="parameters"),
        "block_lora_update": _update_heatmap(trained["Block-LoRA"], targets[0], settings.num_blocks),
    }
    last = shots[-1]
    summary = (
        f"Block-LoRA trains {block_params:,} adapter parameters against CLIP-LoRA's {lora_params:,} "
        f"({1 - block_params / lora_params:.0%} fewer; per token its multiply-adds equal its parameters, plus the "
        f"chunk sums). With {last} images per class of **{settings.shift}** digits the head alone reaches "
        f"{metrics[f'accuracy_head_{last}']:.1%}, CLIP-LoRA {metrics[f'accuracy_lora_{last}']:.1%} and Block-LoRA "
        f"{metrics[f'accuracy_block_lora_{last}']:.1%}. Merged into the weights, Block-LoRA changes the logits by at "
        f"most {merge_difference:.1e}."
    )
    return LabResult(method="block-lora", summary=summary, metrics=metrics, tables={"accuracy": rows},
                     figures=figures, settings=settings.to_dict())


@torch.no_grad()
def _update_heatmap(classifier: ImageClassifier, target: str, num_blocks: int):
    """The merged-minus-base weight of the first adapted layer: its columns repeat every d_in / n."""
    layer = next(name for name, _ in classifier.vit.named_modules() if name.endswith(target))
    weight = classifier.vit.get_submodule(layer).original_module().weight
    base = weight.detach().clone()
    merge(classifier.vit)
    update = (weight.detach() - base).tolist()
    unmerge(classifier.vit)
    return heatmap(update, annotate=False, cmap="RdBu_r", colorbar_label="weight change",
                   title=f"Learned Block-LoRA update of {layer}\n({num_blocks} tied column blocks)",
                   xlabel="input feature", ylabel="output feature",
                   col_labels=[str(i) if i % 8 == 0 else "" for i in range(len(update[0]))],
                   row_labels=[str(i) if i % 8 == 0 else "" for i in range(len(update))])


register_experiment(Experiment(
    method="block-lora", settings_cls=BlockLoRASettings, run=run,
    description="A tiny ViT pre-trained on upright digits learns rotated digits from a few labelled images per "
                "class: a new head alone, CLIP-LoRA, and Block-LoRA, whose down-projection is one block shared by "
                "every chunk of the input. Look at the accuracy against the number of shots beside the trainable "
                "parameters, and at the repeating columns of a learned Block-LoRA update.",
))
