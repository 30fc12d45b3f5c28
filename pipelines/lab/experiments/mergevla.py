"""MergeVLA on four text skills: task arithmetic breaks them, TALL masks and the test-time router recover them.

MergeVLA fine-tunes one LoRA per skill on a shared backbone plus an action head per skill, then merges them
into one model. Here the tiny encoder learns up to four token-classification skills, each on its own block of
the vocabulary (as each LIBERO suite has its own scenes): a LoRA (rank 8, alpha 2r, Gaussian init, as
MergeVLA) on every attention and feed-forward projection, and a two-layer head per skill trained from one
shared initialisation. The merge keeps MergeVLA's layout: the encoder LoRAs and the head's first layer are
merged, the head's last layer stays per skill (the expert). Task arithmetic adds every task vector; TALL masks
retrieve each skill from the sum (each skill scored with its own mask, the oracle); the router picks the mask
and expert from each test input alone, from the right singular vectors of each skill's first head layer, with
MergeVLA's score and with the score divided by the input's norm. Beside it: accuracy and mask density as lambda
changes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from pipelines.adapters import (
    LoRAConfig,
    MergeVLAConfig,
    add_adapter,
    mask_density,
    merge_task_vectors,
    remove_adapter,
    route,
    select_task,
    set_active,
    trainable_parameters,
)
from pipelines.adapters.mergevla import task_vectors_of
from pipelines.lab import Experiment, LabResult, LabSettings, LabSettingsError, Progress, register_experiment
from pipelines.lab.data import (
    CONTENT_TOKENS,
    FIRST_TOKEN,
    TOKEN_VOCAB_SIZE,
    LabData,
    token_classification_task,
)
from pipelines.lab.models import TextClassifier, attention_targets, load_backbone, mlp_targets
from pipelines.lab.plots import bar_plot, line_plot
from pipelines.lab.training import accuracy, classification_loss, fit, predictions, seeded

SKILLS = ("majority", "contains-pattern", "parity")
BLOCK = 7  # content tokens per skill: 28 content tokens, four disjoint blocks
MAX_SKILLS = len(CONTENT_TOKENS) // BLOCK
ROUTER = "head.0"
EXPERT = "head.2"


@dataclass
class MergeVLASettings(LabSettings):
    skills: tuple[str, ...] = field(default=("majority", "contains-pattern", "majority", "contains-pattern"),
                                    metadata={"help": "the token tasks to learn, each on its own block of 7 "
                                                      "tokens (so an input shows which skill it belongs to)",
                                              "label": "Skills", "choices": SKILLS})
    rank: int = field(default=8, metadata={"help": "rank of each skill's LoRA (alpha = 2 rank, as MergeVLA)",
                                           "label": "LoRA rank", "min": 1, "max": 64})
    steps: int = field(default=200, metadata={"help": "training steps per skill", "label": "Steps",
                                              "min": 1, "max": 5000})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate", "label": "Learning rate",
                                                         "min": 1e-6, "max": 1.0})
    mask_lambda: float = field(default=0.6, metadata={"help": "lambda of the TALL masks (MergeVLA: 0.6)",
                                                      "label": "Mask lambda", "min": 0.0, "max": 10.0})
    lambdas: tuple[float, ...] = field(default=(0.2, 0.4, 0.6, 0.8, 1.0), metadata={
        "help": "lambdas for the sweep of masked accuracy and mask density", "label": "Lambda sweep",
        "min": 0.0, "max": 10.0})
    router_k: int = field(default=8, metadata={"help": "right singular vectors per skill in the router "
                                                       "(MergeVLA's k_gate: 8)", "label": "Router k",
                                               "min": 1, "max": 64})
    train_examples: int = field(default=512, metadata={"help": "training sequences per skill",
                                                       "label": "Training examples", "min": 16, "max": 20000})
    test_examples: int = field(default=256, metadata={"help": "test sequences per skill", "label": "Test examples",
                                                      "min": 16, "max": 20000})
    batch_size: int = field(default=32, metadata={"help": "sequences per step", "label": "Batch size",
                                                  "min": 1, "max": 1024})

    @classmethod
    def quick(cls) -> MergeVLASettings:
        return cls(skills=("majority", "contains-pattern", "majority"), steps=120, lambdas=(0.3, 0.6, 1.0),
                   train_examples=256, test_examples=128)

    def validate(self) -> None:
        super().validate()
        if not 2 <= len(self.skills) <= MAX_SKILLS:
            raise LabSettingsError(f"skills must list 2 to {MAX_SKILLS} tasks (the vocabulary holds {MAX_SKILLS} "
                                   f"blocks of {BLOCK} tokens), not {len(self.skills)}")
        if self.router_k > 64:
            raise LabSettingsError("router_k must be at most 64, the width of the head's first layer")


def vocabulary_block(data: LabData, block: int) -> LabData:
    """The same task on content tokens block*7 .. block*7+6 only: the first three content tokens (A, B, C, which
    the tasks are about) keep their roles, every other content token folds onto the block's last four."""
    table = torch.arange(TOKEN_VOCAB_SIZE)
    first = FIRST_TOKEN + BLOCK * block
    for k in range(len(CONTENT_TOKENS)):
        table[FIRST_TOKEN + k] = first + (k if k < 3 else 3 + (k - 3) % (BLOCK - 3))
    return replace(data, inputs=table[data.inputs], name=f"{data.name}@{block}")


def skill_names(skills: tuple[str, ...]) -> list[str]:
    return [f"s{i + 1}-{skill}" for i, skill in enumerate(skills)]


def _head(hidden: int, labels: int) -> nn.Sequential:
    """The action head: a shared first layer (merged, and the router's) and a last layer per skill (the expert).
    No biases, so each layer's whole change is its weight's task vector."""
    return nn.Sequential(nn.Linear(hidden, hidden, bias=False), nn.GELU(), nn.Linear(hidden, labels, bias=False))


@torch.no_grad()
def _predictions_per_mask(model: TextClassifier, data: LabData, tasks: list[str]) -> torch.Tensor:
    """(tasks, examples): the label each skill's mask and expert predict."""
    out = []
    for task in tasks:
        select_task(model, "merged", task)
        out.append(predictions(model, data))
    return torch.stack(out)


def run(settings: MergeVLASettings, progress: Progress) -> LabResult:
    progress.update(0.0, "loading the encoder and the skills")
    encoder = load_backbone("encoder", settings.model_id)
    tasks = skill_names(settings.skills)
    data = {
        task: tuple(vocabulary_block(token_classification_task(skill, split, n=n, seed=settings.seed), i)
                    for split, n in (("train", settings.train_examples), ("test", settings.test_examples)))
        for i, (task, skill) in enumerate(zip(tasks, settings.skills, strict=True))
    }
    hidden = encoder.config.hidden_size
    with seeded(settings.seed):
        model = TextClassifier(encoder, 2)
        head0 = _head(hidden, 2)
    model.encoder.requires_grad_(False)
    targets = attention_targets(encoder) + mlp_targets(encoder)

    # One LoRA and one head per skill, each head from the same initialisation.
    heads, individual = {}, {}
    for i, task in enumerate(tasks):
        train, test = data[task]
        with seeded(settings.seed + 1 + i):
            add_adapter(model, LoRAConfig(rank=settings.rank, scale=2.0, target_modules=targets), name=task)
        set_active(model, [task])
        model.head = copy.deepcopy(head0)
        span = progress.span(0.02 + 0.8 * i / len(tasks), 0.02 + 0.8 * (i + 1) / len(tasks))
        fit(model, trainable_parameters(model, task) + list(model.head.parameters()), classification_loss, train,
            settings.steps, settings.learning_rate, span, batch_size=settings.batch_size, seed=settings.seed + i,
            message=f"training {task}")
        model.head.requires_grad_(False)
        heads[task] = model.head
        individual[task] = accuracy(model, test)

    # Task vectors: the LoRA updates, and each head's change from the shared initialisation.
    progress.update(0.83, "merging")
    vectors = task_vectors_of(model, tasks)
    for task in tasks:
        vectors[task][ROUTER] = (heads[task][0].weight - head0[0].weight).detach().clone()
        vectors[task][EXPERT] = (heads[task][2].weight - head0[2].weight).detach().clone()
    for task in tasks:
        remove_adapter(model, task)
    model.head = copy.deepcopy(head0)
    config = MergeVLAConfig(mask_lambda=settings.mask_lambda, router_k=settings.router_k, router_modules=[ROUTER],
                            expert_modules=[EXPERT])
    merge_task_vectors(model, vectors, config, name="merged")

    rows, metrics = [], {}
    scores = {"task arithmetic": [], "TALL mask (own mask)": [], "routed, MergeVLA score": [],
              "routed, relative score": []}
    router_hits = {"norm": [], "relative": []}
    for i, task in enumerate(tasks):
        progress.update(0.85 + 0.1 * i / len(tasks), f"evaluating {task}")
        test = data[task][1]
        select_task(model, "merged", None)
        arithmetic = accuracy(model, test)
        per_mask = _predictions_per_mask(model, test, tasks)
        own = float((per_mask[i] == test.labels).float().mean())
        row = {"skill": task, "individual": round(individual[task], 4), "task arithmetic": round(arithmetic, 4),
               "TALL mask (own mask)": round(own, 4)}
        for score, label in (("norm", "routed, MergeVLA score"), ("relative", "routed, relative score")):
            routing = route(model, "merged", lambda test=test: model(test.inputs, test.attention_mask), score=score)
            chosen = routing.probabilities.argmax(-1)
            routed = float((per_mask[chosen, torch.arange(len(test))] == test.labels).float().mean())
            hits = float((chosen == i).float().mean())
            row[label] = round(routed, 4)
            row[f"router right ({score})"] = round(hits, 4)
            router_hits[score].append(hits)
            scores[label].append(routed)
        scores["task arithmetic"].append(arithmetic)
        scores["TALL mask (own mask)"].append(own)
        rows.append(row)
    density = mask_density(model, "merged")

    # Lambda sweep: masked accuracy (own mask) and mask density.
    sweep_accuracy, sweep_density = [], []
    lambdas = sorted(set(settings.lambdas))
    for j, value in enumerate(lambdas):
        progress.update(0.95 + 0.04 * j / len(lambdas), f"lambda {value:g}")
        remove_adapter(model, "merged")
        merge_task_vectors(model, vectors, replace(config, mask_lambda=value), name="merged")
        hits = [accuracy_with(model, task, data[task][1]) for task in tasks]
        sweep_accuracy.append(sum(hits) / len(hits))
        sweep_density.append(sum(mask_density(model, "merged").values()) / len(tasks))

    mean = {label: sum(values) / len(values) for label, values in scores.items()}
    metrics.update({
        "individual_accuracy": sum(individual.values()) / len(tasks),
        "task_arithmetic_accuracy": mean["task arithmetic"],
        "masked_accuracy": mean["TALL mask (own mask)"],
        "routed_accuracy": mean["routed, MergeVLA score"],
        "routed_relative_accuracy": mean["routed, relative score"],
        "router_accuracy": sum(router_hits["norm"]) / len(tasks),
        "router_relative_accuracy": sum(router_hits["relative"]) / len(tasks),
        "mask_density": sum(density.values()) / len(tasks),
    })
    bars = {"individual": [individual[t] for t in tasks], **scores}
    figures = {
        "accuracy_per_skill": bar_plot(tasks, bars, title="Test accuracy per skill: alone, merged, masked, routed",
                                       xlabel="skill", ylabel="test accuracy"),
        "router": bar_plot(tasks, {"MergeVLA score": router_hits["norm"], "relative score": router_hits["relative"]},
                           title="Router: share of test inputs given their own skill", xlabel="skill",
                           ylabel="routed to the right skill"),
        "mask_density": bar_plot(tasks, [density[t] for t in tasks],
                                 title=f"TALL mask density (lambda {settings.mask_lambda:g})", xlabel="skill",
                                 ylabel="share of weights kept"),
        "lambda_sweep": line_plot({"masked accuracy (own mask)": (lambdas, sweep_accuracy),
                                   "mask density": (lambdas, sweep_density)},
                                  hlines={"task arithmetic": mean["task arithmetic"],
                                          "individual": metrics["individual_accuracy"]},
                                  ylim=(0.0, 1.02), title="Masked accuracy and mask density against lambda",
                                  xlabel="lambda", ylabel="mean over skills"),
    }
    summary = (
        f"Each of {len(tasks)} skills alone scores {metrics['individual_accuracy']:.1%} on average. Adding all task "
        f"vectors (task arithmetic) drops that to {metrics['task_arithmetic_accuracy']:.1%}. With TALL masks "
        f"(lambda {settings.mask_lambda:g}, {metrics['mask_density']:.0%} of the weights kept per skill) each skill "
        f"retrieved with its own mask scores {metrics['masked_accuracy']:.1%}. Routed from each test input alone, "
        f"MergeVLA's router picks the right skill for {metrics['router_accuracy']:.0%} of the inputs "
        f"({metrics['routed_accuracy']:.1%} accuracy); dividing its score by the input's norm, for "
        f"{metrics['router_relative_accuracy']:.0%} ({metrics['routed_relative_accuracy']:.1%})."
    )
    return LabResult(method="mergevla", summary=summary, metrics=metrics, tables={"skills": rows},
                     figures=figures, settings=settings.to_dict())


def accuracy_with(model: TextClassifier, task: str, data: LabData) -> float:
    select_task(model, "merged", task)
    return accuracy(model, data)


register_experiment(Experiment(
    method="mergevla", settings_cls=MergeVLASettings, run=run,
    description="The tiny encoder learns several token skills, each on its own vocabulary, with one LoRA and "
                "one head each, then merges them. Look at task arithmetic failing, each skill retrieved by its "
                "TALL mask, the router choosing the mask from the input alone, and the masks' density.",
))
