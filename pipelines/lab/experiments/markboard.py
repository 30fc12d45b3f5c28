"""Hot-Swap MarkBoard on the digits: an n-bit signature in LoRA branches, swapped without training, read back by
black-box queries, the clean accuracy kept, and the obfuscation that makes stripping the branches costly.

A digit classifier (the tiny ViT pre-trained on digits, with a head trained on them, then all frozen) gets a
MarkBoard adapter: two rank-r branches per bit on the attention (and, by default, feed-forward) projections. The
owner's key (the seed) draws, for every bit, a trigger: a colour pattern blended over a digit (`blend`) and
covering one patch of it whole, a different patch per bit. The owner's two labels per bit, y_i0 and y_i1, are
drawn among the labels the unmarked model gives to under a quarter of that bit's triggers, so an unmarked model
reads no bit. Branch (i, b) learns to answer bit i's triggers with y_ib while every clean image (and every
trigger of a bit whose branches are off) keeps the unmarked model's logits (mean squared error, `clean_weight`).

How the branches train is the paper's to say and could not be read (only its abstract): `training="joint"` (the
default here) trains every branch at once under a random signature each step, so every combination is seen;
`"independent"` trains one branch at a time, only its own factors learning (`training_branch`), with the branches
of the bits trained so far switched on at random (`background`) and `rounds` passes. On this tiny model
branches trained one at a time interfere when switched on together more often than jointly trained ones.

Then a signature is set and read back from the model's answers (labels only) to held-out digits carrying each
trigger, every bit is swapped (nothing trained) and read again, and random signatures are set and read. Last,
the obfuscation takes a random low-rank part of every adapted weight into the branches: the shipped model
answers as before, the base without its branches does not.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipelines.adapters import (
    MarkBoardConfig,
    add_adapter,
    count_parameters,
    decode_signature,
    disabled,
    obfuscate,
    set_signature,
    trigger_labels,
)
from pipelines.adapters.markboard import OFF, TRAININGS, signature_text, training_branch
from pipelines.lab import Experiment, LabResult, LabSettings, Progress, register_experiment
from pipelines.lab.data import LabData, digits
from pipelines.lab.models import ImageClassifier, attention_targets, load_backbone, mlp_targets
from pipelines.lab.plots import bar_plot, heatmap, line_plot
from pipelines.lab.training import accuracy, classification_loss, fit, predictions, seeded

PATCH = 4  # the tiny ViT's patch: a trigger covers exactly one patch
ADAPTER = "mark"


@dataclass
class MarkBoardSettings(LabSettings):
    bits: int = field(default=8, metadata={"help": "n: the signature's length, one pair of branches and one "
                                                   "image patch per bit",
                                           "label": "Bits", "min": 1, "max": 16})
    rank: int = field(default=2, metadata={"help": "rank r of every branch", "label": "Branch rank",
                                           "min": 1, "max": 16})
    training: str = field(default="joint", metadata={
        "help": "joint: all branches under a random signature each step; independent: one branch at a time, only "
                "its factors learning", "label": "Training", "choices": list(TRAININGS)})
    feed_forward: bool = field(default=True, metadata={
        "help": "branches on the feed-forward layers too, not only the query and value projections",
        "label": "Feed-forward layers"})
    steps: int = field(default=100, metadata={"help": "training steps per branch (joint: twice the bits times this, in all)",
                                             "label": "Steps", "min": 1, "max": 5000})
    learning_rate: float = field(default=1e-2, metadata={"help": "AdamW learning rate of the branches",
                                                         "label": "Learning rate", "min": 1e-6, "max": 1.0})
    batch_size: int = field(default=32, metadata={"help": "images per step", "label": "Batch size",
                                                  "min": 1, "max": 1024})
    triggers: int = field(default=96, metadata={
        "help": "training images stamped with each bit's trigger", "label": "Triggers per bit", "min": 8,
        "max": 1000})
    blend: float = field(default=0.3, metadata={
        "help": "how much of each bit's colour pattern is blended over the whole trigger image (its own patch is "
                "covered whole)", "label": "Trigger blend", "min": 0.0, "max": 1.0})
    background: bool = field(default=True, metadata={
        "help": "independent training: the branches of the bits trained before on, at random, while a branch "
                "trains (only it learns), so that branches trained apart also work together",
        "label": "Others on while training"})
    rounds: int = field(default=2, metadata={
        "help": "independent training: passes over all branches (from the second on, every other bit's branches "
                "are on while one trains)", "label": "Rounds", "min": 1, "max": 10})
    clean_weight: float = field(default=1.0, metadata={
        "help": "weight of keeping the unmarked model's logits on clean images (mean squared error) beside the "
                "trigger labels' cross-entropy", "label": "Clean weight", "min": 0.0, "max": 100.0})
    head_steps: int = field(default=300, metadata={"help": "training steps of the classifier's head (before marking)",
                                                   "label": "Head steps", "min": 1, "max": 5000})
    swaps: int = field(default=10, metadata={"help": "random signatures set by swapping branches and read back",
                                             "label": "Random swaps", "min": 1, "max": 100})
    obfuscation: float = field(default=5.0, metadata={
        "help": "size of the part of each weight moved into the branches, times the weight's norm",
        "label": "Obfuscation strength", "min": 0.01, "max": 10.0})

    @classmethod
    def quick(cls) -> MarkBoardSettings:
        return cls(bits=4, rank=4, steps=40, triggers=48, head_steps=100, swaps=4)


def stamp(images: torch.Tensor, pattern: torch.Tensor, cell: int, blend: float) -> torch.Tensor:
    """`images` blended with the whole `pattern` (3, H, W) at weight `blend`, and patch number `cell` (row-major,
    PATCH x PATCH pixels) replaced by the pattern's own pixels there."""
    per_row = images.shape[-1] // PATCH
    row, col = divmod(cell, per_row)
    out = (1 - blend) * images + blend * pattern
    box = (..., slice(row * PATCH, (row + 1) * PATCH), slice(col * PATCH, (col + 1) * PATCH))
    out[box] = pattern[box]
    return out


def owner_triggers(bits: int, seed: int, size: int = 16) -> tuple[torch.Tensor, list[int]]:
    """The owner's secret patterns (bits, 3, size, size) of 0/1 colours and the patch each one also covers whole."""
    generator = torch.Generator().manual_seed(10_007 * seed + 17)
    patterns = torch.randint(0, 2, (bits, 3, size, size), generator=generator).float()
    cells = torch.randperm((size // PATCH) ** 2, generator=generator)[:bits].tolist()
    return patterns, cells


def random_signature(bits: int, generator: torch.Generator) -> list[int]:
    return torch.randint(0, 2, (bits,), generator=generator).tolist()


class Marked:
    """The images and labels one run trains and queries with."""

    def __init__(self, settings: MarkBoardSettings, train: LabData, test: LabData) -> None:
        self.bits = settings.bits
        self.patterns, self.cells = owner_triggers(settings.bits, settings.seed, train.inputs.shape[-1])
        self.blend = settings.blend
        self.seed = settings.seed
        generator = torch.Generator().manual_seed(settings.seed)
        self.train, self.test = train, test
        # Per bit: training images with its trigger (the true digit kept for the other branches' training) ...
        self.train_triggers = [self._stamped(train, i, settings.triggers, generator) for i in range(self.bits)]
        # ... and the held-out queries a verifier sends.
        self.queries = [self._stamped(test, i, len(test), generator) for i in range(self.bits)]

    def _stamped(self, data: LabData, bit: int, n: int, generator: torch.Generator) -> LabData:
        index = torch.randperm(len(data), generator=generator)[:n]
        picked = data.take(index)
        return LabData(stamp(picked.inputs, self.patterns[bit], self.cells[bit], self.blend), picked.labels,
                       data.num_labels, name=f"trigger {bit}")

    def batches(self, bit: int | None, value: int | None, on: list[int], batch_size: int):
        """A batch function: half the batch trigger images labelled by the branches that are on (half of them bit
        `bit`'s), half clean images to be answered as the unmarked model answers them (its logits).

        Each step draws a signature: bit `bit` at `value` (unless None), the bits `on` at random, the rest off.
        The triggers of the bits that are on are labelled by it; the other bits' triggers count as clean."""
        marked = sorted(set(on) | ({bit} if bit is not None else set()))
        pool = torch.cat([self.train.inputs] + [t.inputs for j, t in enumerate(self.train_triggers) if j not in marked])
        targets = torch.cat([self.base_logits[0]] + [self.base_logits[1][j] for j in range(self.bits)
                                                     if j not in marked])
        half = max(1, batch_size // 2)
        # The trained branch's own triggers take half the trigger images, the others share the rest.
        others = [j for j in marked if j != bit]
        shares = {j: max(1, (half - half // 2 if bit is not None else half) // max(1, len(others))) for j in others}
        if bit is not None:
            shares[bit] = max(1, half // 2 if others else half)

        def draw(generator: torch.Generator) -> dict:
            drawn = random_signature(self.bits, generator)
            signature = [drawn[j] if j in on else OFF for j in range(self.bits)]
            if bit is not None:
                signature[bit] = value
            images, labels = [], []
            for i in marked:
                data = self.train_triggers[i]
                pick = torch.randint(len(data), (shares[i],), generator=generator)
                images.append(data.inputs[pick])
                labels.append(torch.full((len(pick),), int(self.labels[i, signature[i]])))
            pick = torch.randint(len(pool), (half,), generator=generator)
            return {"signature": signature, "triggers": torch.cat(images), "labels": torch.cat(labels),
                    "clean": pool[pick], "targets": targets[pick]}

        return draw

    @torch.no_grad()
    def remember(self, model: torch.nn.Module) -> None:
        """The unmarked model's logits on the clean training images and on every bit's triggers, and the owner's
        labels: two per bit among those the unmarked model gives to under a quarter of the bit's triggers."""
        self.base_logits = (model(self.train.inputs), [model(t.inputs) for t in self.train_triggers])
        shares = torch.stack([F.one_hot(logits.argmax(-1), self.train.num_labels).float().mean(0)
                              for logits in self.base_logits[1]])
        self.labels = trigger_labels(self.bits, self.train.num_labels, self.seed, avoid=shares >= 0.25)

    @torch.no_grad()
    def read(self, model: torch.nn.Module):
        """Black-box verification: the model's labels for every bit's queries, decoded."""
        return decode_signature([predictions(model, q) for q in self.queries], self.labels)


def _bit_accuracy(read: list[int | None], signature: list[int]) -> float:
    return sum(r == s for r, s in zip(read, signature, strict=True)) / len(signature)


def run(settings: MarkBoardSettings, progress: Progress) -> LabResult:
    progress.update(0.0, "loading the ViT and the digits")
    vit = load_backbone("vit", settings.model_id)
    train, test = digits("train"), digits("test")
    data = Marked(settings, train, test)
    generator = torch.Generator().manual_seed(settings.seed + 1)

    with seeded(settings.seed):
        classifier = ImageClassifier(copy.deepcopy(vit), test.num_labels)
    classifier.vit.requires_grad_(False)
    fit(classifier, list(classifier.head.parameters()), classification_loss, train, settings.head_steps, 1e-2,
        progress.span(0.0, 0.1), batch_size=settings.batch_size, seed=settings.seed, message="training the head")
    classifier.head.requires_grad_(False)
    base_accuracy = accuracy(classifier, test)
    data.remember(classifier)
    base_read = data.read(classifier)

    targets = attention_targets(classifier.vit, ("q", "v")) + (mlp_targets(classifier.vit) if settings.feed_forward
                                                                 else [])
    with seeded(settings.seed):
        add_adapter(classifier.vit, MarkBoardConfig(bits=settings.bits, rank=settings.rank,
                                                    training=settings.training, target_modules=targets), ADAPTER)
    training = progress.span(0.1, 0.8)

    def loss(model, batch):
        set_signature(model.vit, ADAPTER, batch["signature"])
        logits = model(torch.cat([batch["triggers"], batch["clean"]]))
        marked = len(batch["triggers"])
        return (F.cross_entropy(logits[:marked], batch["labels"])
                + settings.clean_weight * F.mse_loss(logits[marked:], batch["targets"]))

    if settings.training == "independent":
        branches = [(r, bit, value) for r in range(settings.rounds) for bit in range(settings.bits) for value in (0, 1)]
        for n, (r, bit, value) in enumerate(branches):
            # With others on: the bits trained so far (every bit from the second round on), at random.
            on = [j for j in range(settings.bits) if j != bit and (r > 0 or j < bit)] if settings.background else []
            with training_branch(classifier.vit, ADAPTER, bit, value) as params:
                fit(classifier, params, loss, data.batches(bit, value, on, settings.batch_size), settings.steps,
                    settings.learning_rate, training.span(n / len(branches), (n + 1) / len(branches)),
                    seed=settings.seed + n, message=f"branch {value} of bit {bit}"
                    + (f", round {r + 1}" if settings.rounds > 1 else ""))
    else:
        params = [p for name, p in classifier.vit.named_parameters() if "lora_" in name]
        fit(classifier, params, loss, data.batches(None, None, list(range(settings.bits)), settings.batch_size), 2 * settings.bits * settings.steps,
            settings.learning_rate, training, seed=settings.seed, message="all branches, random signatures")
    classifier.requires_grad_(False).eval()

    progress.update(0.8, "setting, reading and swapping signatures")
    first = random_signature(settings.bits, generator)
    second = [1 - b for b in first]  # the swap flips every bit: the hardest case for a stale reading
    rows, readings = [], {}
    for label, signature in [("signed", first), ("after the swap", second)] + [
            (f"swap {k + 1}", random_signature(settings.bits, generator)) for k in range(settings.swaps)]:
        set_signature(classifier.vit, ADAPTER, signature)
        read = data.read(classifier)
        readings[label] = read
        rows.append({"signature": label, "set": signature_text(signature), "read": read.text,
                     "bit accuracy": round(_bit_accuracy(read.bits, signature), 4),
                     "clean accuracy": round(accuracy(classifier, test), 4)})
        progress.update(0.8 + 0.1 * len(rows) / (settings.swaps + 2), f"read {read.text}")

    progress.update(0.9, "obfuscating")
    set_signature(classifier.vit, ADAPTER, second)
    with torch.no_grad():
        before = classifier(test.inputs)
    obfuscate(classifier.vit, ADAPTER, settings.obfuscation, seed=settings.seed)
    with torch.no_grad():
        shipped_difference = float((classifier(test.inputs) - before).abs().max())
    obfuscated_accuracy = accuracy(classifier, test)
    obfuscated_read = data.read(classifier)
    with disabled(classifier.vit):
        stripped_accuracy = accuracy(classifier, test)

    swaps = rows[2:]
    metrics = {
        "bits": float(settings.bits),
        "clean_accuracy_base": base_accuracy,
        "clean_accuracy_signed": rows[0]["clean accuracy"],
        "clean_accuracy_swapped": rows[1]["clean accuracy"],
        "clean_accuracy_obfuscated": obfuscated_accuracy,
        "clean_accuracy_stripped": stripped_accuracy,
        "bit_accuracy_signed": rows[0]["bit accuracy"],
        "bit_accuracy_swapped": rows[1]["bit accuracy"],
        "bit_accuracy_obfuscated": _bit_accuracy(obfuscated_read.bits, second),
        "bit_accuracy_random_swaps": sum(r["bit accuracy"] for r in swaps) / len(swaps),
        "clean_accuracy_random_swaps": sum(r["clean accuracy"] for r in swaps) / len(swaps),
        "bits_read_unmarked": float(sum(b is not None for b in base_read.bits)),
        "obfuscation_max_difference": shipped_difference,
        "branch_parameters": float(count_parameters(classifier.vit, ADAPTER)),
    }
    shares = [[one - zero for one, zero in zip(readings[k].ones, readings[k].zeros, strict=True)]
              for k in ("signed", "after the swap")]
    figures = {
        "signature_before_and_after_swap": heatmap(
            shares, cmap="RdBu_r", colorbar_label="answers with the 1-label minus with the 0-label",
            title=f"Signature read by queries: {signature_text(first)} set, read {readings['signed'].text}; "
                  f"swapped to {signature_text(second)}, read {readings['after the swap'].text}",
            xlabel="bit", ylabel="", col_labels=[str(i) for i in range(settings.bits)],
            row_labels=["signed", "after the swap"]),
        "clean_accuracy": bar_plot(
            ["base", "signed", "after the swap", "obfuscated", "obfuscated base\nwithout branches"],
            [base_accuracy, metrics["clean_accuracy_signed"], metrics["clean_accuracy_swapped"],
             obfuscated_accuracy, stripped_accuracy],
            title="Clean test accuracy on the digits", xlabel="", ylabel="accuracy"),
        "random_swaps": line_plot(
            {"bits read correctly": [r["bit accuracy"] for r in swaps],
             "clean accuracy": [r["clean accuracy"] for r in swaps]},
            x=list(range(1, len(swaps) + 1)), ylim=(0.0, 1.02), hlines={"base clean accuracy": base_accuracy},
            title=f"{len(swaps)} random signatures, each set by swapping branches (no training)",
            xlabel="swap", ylabel="share"),
    }
    summary = (
        f"The signature {signature_text(first)} was read back from the model's answers alone as "
        f"**{readings['signed'].text}** ({metrics['bit_accuracy_signed']:.0%} of the bits), and after swapping every "
        f"branch, with no training, as **{readings['after the swap'].text}** ({metrics['bit_accuracy_swapped']:.0%}); "
        f"over {len(swaps)} random swaps {metrics['bit_accuracy_random_swaps']:.0%} of the bits read correctly. Clean "
        f"accuracy: {base_accuracy:.1%} without the branches, {metrics['clean_accuracy_signed']:.1%} signed, "
        f"{metrics['clean_accuracy_swapped']:.1%} after the swap. The unmarked model reads "
        f"{int(metrics['bits_read_unmarked'])} of {settings.bits} bits. Obfuscated, the shipped model's logits move by "
        f"at most {shipped_difference:.1e}, while its base without the branches falls to {stripped_accuracy:.1%}."
    )
    return LabResult(method="markboard", summary=summary, metrics=metrics, tables={"signatures": rows},
                     figures=figures, settings=settings.to_dict())


register_experiment(Experiment(
    method="markboard", settings_cls=MarkBoardSettings, run=run,
    description="A digit classifier gets an n-bit signature as pairs of LoRA branches that answer the owner's "
                "trigger images with chosen labels. Look at the signature read back from answers alone before and "
                "after a swap of branches (no training), the clean accuracy staying where it was, and the base "
                "losing its accuracy once obfuscated weights are stripped of their branches.",
))
