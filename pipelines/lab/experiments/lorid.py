"""LoRID on word problems: three LoRAs on one small student, and answering only when two of them agree.

The student is the lab's tiny Llama after a short full fine-tuning on general skills it will need (arithmetic
facts such as `7sub2=5`, reading the numbers out of a sentence, and chains of operations written out, such as
`calc:3add4 sub2>3add4=7 7sub2=5>7,5.`): the stand-in for a pre-trained language model that can calculate but has
not met the task. The teacher's data are templated word problems (`has 3,gets 4,eats 2.`): their knowledge is
the list of operations the verbs mean (`add,sub`), their rationale the worked steps (`3add4=7 7sub2=5`) and their
answer the count after each event (`7,5`). The teacher uses some verbs often and others rarely (Zipf's law,
`verb_skew`); the test problems use all equally. Three LoRAs learn with LoRID's prompt structure (short tags
stand in for the official instructions, which would not fit the tiny model's context): the intuitive reasoner
(question -> rationale and answer), the knowledge generator (question -> operations) and the deep reasoner
(question and operations -> rationale and answer). At test time each answers alone, by greedy decoding and by one
sample at the loop's temperature, and then the consistency loop samples the intuitive and the deep reasoner (with
fresh knowledge each time) at the official temperature 1.5 and top-p 0.9 until their answers agree, up to T = 20
times; `lorid_solve` of the method module runs it.

Demo choices (settings): rank 8 with alpha 16 (the official alpha / r = 2; the official rank 512 exceeds the
tiny model's width), the LoRAs on every linear layer of the student by default (on the official query and value
projections alone the tiny student learns the task too slowly for a two-minute demo; `targets` restores them),
AdamW at a constant learning rate for a fixed number of steps.
"""

from __future__ import annotations

import copy
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines.adapters import add_adapter, count_parameters, set_active, trainable_parameters
from pipelines.adapters.lorid import (
    DEEP,
    INTUITIVE,
    KNOWLEDGE,
    ROLES,
    LoRIDConfig,
    LoRIDPrompts,
    answers_match,
    loop_accuracy,
    lorid_solve,
    mean_iterations,
    sample_texts,
)
from pipelines.lab import Experiment, LabResult, LabSettings, Progress, register_experiment
from pipelines.lab.data import LMTask
from pipelines.lab.experiments._sequences import labelled_rows, special_id, text_ids
from pipelines.lab.models import attention_targets, load_backbone, mlp_targets
from pipelines.lab.plots import bar_plot, line_plot
from pipelines.lab.training import fit, lm_loss, seeded

TARGETS = ("all-linear", "query-value")
ADD_VERBS = ("gets", "buys", "wins", "adds", "digs", "made", "grew", "took")
SUB_VERBS = ("eats", "uses", "pays", "lost", "gave", "sold", "hide", "drop")
ADAPTER_NAMES = {INTUITIVE: "ir", KNOWLEDGE: "kg", DEEP: "dr"}
SHORT = {INTUITIVE: "IR", KNOWLEDGE: "KG", DEEP: "DR"}

# LoRID's three prompts with a short tag in place of each official instruction (see the module docstring).
PROMPTS = LoRIDPrompts(intuitive="ir:{question}>", knowledge="kg:{question}>", deep="dr:{question}k:{knowledge}>",
                       solution="{rationale}>{answer}.", knowledge_separator=",", answer_pattern=r">\s*(.*?)\s*\.")


@dataclass
class LoRIDSettings(LabSettings):
    reasoning_steps: int = field(default=3, metadata={
        "help": "operations per word problem", "label": "Reasoning steps", "min": 1, "max": 4})
    train_problems: int = field(default=1500, metadata={
        "help": "word problems in the teacher's data", "label": "Training problems", "min": 16, "max": 20000})
    verb_skew: float = field(default=1.5, metadata={
        "help": "Zipf exponent of the verbs in the teacher's data (0: every verb equally often; the test problems "
                "use every verb equally often)", "label": "Verb skew", "min": 0.0, "max": 5.0})
    pretrain_steps: int = field(default=800, metadata={
        "help": "full fine-tuning steps teaching the student arithmetic, reading numbers and written-out chains",
        "label": "Student pre-training steps", "min": 0, "max": 5000})
    reasoner_steps: int = field(default=300, metadata={
        "help": "training steps of the intuitive and of the deep reasoner", "label": "Reasoner steps",
        "min": 1, "max": 5000})
    knowledge_steps: int = field(default=200, metadata={
        "help": "training steps of the knowledge generator", "label": "Knowledge generator steps",
        "min": 1, "max": 5000})
    rank: int = field(default=8, metadata={"help": "LoRA rank of each of the three adapters", "label": "Rank",
                                           "min": 1, "max": 512})
    alpha: float = field(default=16.0, metadata={
        "help": "the update is scaled by alpha / rank (official ratio 1024 / 512 = 2)", "label": "Alpha",
        "min": 0.01, "max": 4096})
    targets: str = field(default="all-linear", metadata={
        "help": "layers with the LoRAs: every linear layer, or the official query and value projections",
        "label": "Adapted layers", "choices": TARGETS})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate", "label": "Learning rate",
                                                         "min": 1e-6, "max": 1.0})
    batch_size: int = field(default=16, metadata={"help": "examples per step", "label": "Batch size",
                                                  "min": 1, "max": 1024})
    test_problems: int = field(default=100, metadata={"help": "held-out word problems", "label": "Test problems",
                                                      "min": 4, "max": 2000})
    max_iterations: int = field(default=20, metadata={
        "help": "T: samples of each reasoner before a question counts as unresolved (official: 20)",
        "label": "Max iterations T", "min": 1, "max": 100})
    temperature: float = field(default=1.5, metadata={"help": "sampling temperature in the loop (official: 1.5)",
                                                      "label": "Temperature", "min": 0.0, "max": 10.0})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling mass in the loop (official: 0.9)",
                                                "label": "Top-p", "min": 0.01, "max": 1.0})

    @classmethod
    def quick(cls) -> LoRIDSettings:
        return cls(reasoning_steps=2, verb_skew=1.0, pretrain_steps=600, reasoner_steps=200, knowledge_steps=120,
                   test_problems=40, max_iterations=10)


# -- the teacher's data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    question: str  # "has 3,gets 4,eats 2."
    knowledge: tuple[str, ...]  # ("add", "sub")
    rationale: str  # "3add4=7 7sub2=5"
    answer: str  # the count after each event: "7,5"


def word_problem(rng: random.Random, steps: int, skew: float = 0.0) -> Problem:
    """A count between 0 and 9 changed `steps` times by a verb meaning add or subtract (staying in 0..9).

    Verbs are drawn with weights 1 / rank^`skew` (Zipf's law; 0 draws them uniformly), so with a skew the
    teacher's data show the first verbs of each list often and the last ones rarely."""
    total = rng.randint(1, 9)
    parts, ops, worked, counts = [f"has {total}"], [], [], []
    for _ in range(steps):
        op = rng.choice([op for op, ok in (("add", total < 9), ("sub", total > 0)) if ok])
        amount = rng.randint(1, 9 - total) if op == "add" else rng.randint(1, total)
        new = total + amount if op == "add" else total - amount
        verbs = ADD_VERBS if op == "add" else SUB_VERBS
        parts.append(f"{rng.choices(verbs, weights=[1 / (i + 1) ** skew for i in range(len(verbs))])[0]} {amount}")
        ops.append(op)
        worked.append(f"{total}{op}{amount}={new}")
        counts.append(str(new))
        total = new
    return Problem(",".join(parts) + ".", tuple(ops), " ".join(worked), ",".join(counts))


def word_problems(n: int, steps: int, seed: int, split: str, skew: float = 0.0) -> list[Problem]:
    rng = random.Random(f"lorid/{split}/{steps}/{seed}")
    return [word_problem(rng, steps, skew) for _ in range(n)]


def student_corpus(n: int, steps: int, seed: int) -> list[tuple[str, str]]:
    """What the student learns before distillation: arithmetic facts, the numbers of a sentence, and chains of
    written-out operations (never the verbs' meaning, which only the teacher's knowledge carries)."""
    rng = random.Random(f"lorid/student/{seed}")
    pairs = []
    for _ in range(n):
        a = rng.randint(0, 9)
        b = rng.randint(0, 9 - a) if rng.random() < 0.5 else -rng.randint(0, a)
        pairs.append((f"{a}add{b}=" if b >= 0 else f"{a}sub{-b}=", str(a + b)))
        problem = word_problem(rng, rng.randint(1, steps))
        pairs.append((f"nums:{problem.question}>", "".join(c for c in problem.question if c.isdigit())))
        problem = word_problem(rng, rng.randint(1, steps))
        first, *rest = problem.rationale.split(" ")
        calc = " ".join([first.split("=")[0]] + [step.split("=")[0].lstrip("0123456789") for step in rest])
        pairs.append((f"calc:{calc}>", PROMPTS.solution_text(problem.rationale, problem.answer)))
        pairs.append((f"ops:{calc}>", PROMPTS.knowledge_text(problem.knowledge)))
    return pairs


def lm_batch(pairs: list[tuple[str, str]], tokenizer: Any, name: str, *, whole: bool = False) -> LMTask:
    """Tensors for (prompt, target) pairs with any tokenizer: the prompt (with the tokenizer's start token), the
    target and an end token; the loss on the target only, or on everything with `whole`."""
    eos = special_id(tokenizer, "eos")
    rows, starts = [], []
    for prompt, target in pairs:
        head = list(tokenizer.encode(prompt))
        rows.append(head + text_ids(tokenizer, target) + ([eos] if eos is not None else []))
        starts.append(0 if whole else len(head))
    ids, mask, labels = labelled_rows(rows, starts, special_id(tokenizer, "pad") or 0)
    return LMTask(name, tuple(p for p, _ in pairs), tuple(t for _, t in pairs), ids, mask, labels)


# -- the run --------------------------------------------------------------------------------------------------


def _targets(model: torch.nn.Module, which: str) -> list[str]:
    if which == "query-value":
        return attention_targets(model, ("q", "v"))
    return attention_targets(model, ("q", "k", "v", "o")) + mlp_targets(model)


def _greedy(model, tokenizer, name: str, prompts: list[str], max_new_tokens: int) -> list[str]:
    set_active(model, [name])
    return sample_texts(model, tokenizer, prompts, temperature=0.0, max_new_tokens=max_new_tokens)


def _share(answers: list[str], problems: list[Problem]) -> float:
    return sum(answers_match(a, p.answer) for a, p in zip(answers, problems, strict=True)) / len(problems)


def run(settings: LoRIDSettings, progress: Progress) -> LabResult:
    progress.update(0.0, "loading the student")
    model, tokenizer = load_backbone("causal_lm", settings.model_id)
    train = word_problems(settings.train_problems, settings.reasoning_steps, settings.seed, "train",
                          settings.verb_skew)
    test = word_problems(settings.test_problems, settings.reasoning_steps, settings.seed, "test")
    max_new = len(PROMPTS.solution_text(test[0].rationale, "9")) + 8

    if settings.pretrain_steps:
        corpus = lm_batch(student_corpus(1500, settings.reasoning_steps, settings.seed), tokenizer, "student")
        fit(model, model.parameters(), lm_loss, corpus, settings.pretrain_steps, settings.learning_rate,
            progress.span(0.0, 0.15), batch_size=32, seed=settings.seed, message="pre-training the student")
    model.requires_grad_(False)
    model.eval()
    student = copy.deepcopy(model)  # the student before distillation, for the "no adapter" row

    targets = _targets(model, settings.targets)
    for i, role in enumerate(ROLES):
        with seeded(settings.seed + 1 + i):
            add_adapter(model, LoRIDConfig(role=role, rank=settings.rank, alpha=settings.alpha, dropout=0.1,
                                           target_modules=targets), name=ADAPTER_NAMES[role])
    spans = {INTUITIVE: (0.15, 0.35), KNOWLEDGE: (0.35, 0.45), DEEP: (0.45, 0.65)}
    for role in ROLES:
        name = ADAPTER_NAMES[role]
        set_active(model, [name])
        data = lm_batch([PROMPTS.training_pair(role, p.question, p.rationale, p.answer, p.knowledge) for p in train],
                        tokenizer, role)
        steps = settings.knowledge_steps if role == KNOWLEDGE else settings.reasoner_steps
        fit(model, trainable_parameters(model, name), lm_loss, data, steps, settings.learning_rate,
            progress.span(*spans[role]), batch_size=settings.batch_size, seed=settings.seed,
            message=f"training the {role.replace('_', ' ')}")
    model.eval()

    progress.update(0.65, "each module alone (greedy)")
    questions = [p.question for p in test]
    gold = [PROMPTS.knowledge_text(p.knowledge) for p in test]
    no_adapter = sample_texts(student, tokenizer, [PROMPTS.prompt(INTUITIVE, q) for q in questions],
                              temperature=0.0, max_new_tokens=max_new)
    intuitive = _greedy(model, tokenizer, "ir", [PROMPTS.prompt(INTUITIVE, q) for q in questions], max_new)
    knowledge = _greedy(model, tokenizer, "kg", [PROMPTS.prompt(KNOWLEDGE, q) for q in questions], max_new)
    deep = _greedy(model, tokenizer, "dr", [PROMPTS.prompt(DEEP, q, k) for q, k in zip(questions, knowledge,
                                                                                           strict=True)], max_new)
    deep_gold = _greedy(model, tokenizer, "dr", [PROMPTS.prompt(DEEP, q, k) for q, k in zip(questions, gold,
                                                                                                strict=True)], max_new)
    alone = {
        "student without adapters": _share([PROMPTS.extract(t) for t in no_adapter], test),
        "IR alone": _share([PROMPTS.extract(t) for t in intuitive], test),
        "KG + DR alone": _share([PROMPTS.extract(t) for t in deep], test),
        "DR, gold knowledge": _share([PROMPTS.extract(t) for t in deep_gold], test),
    }
    knowledge_accuracy = sum(k.strip() == g for k, g in zip(knowledge, gold, strict=True)) / len(test)

    loop_progress = progress.span(0.7, 1.0)

    def report(t: int, pending: int) -> None:
        loop_progress.update((t - 1) / settings.max_iterations,
                             f"consistency loop: iteration {t}/{settings.max_iterations}, {pending} questions open")

    outcomes = lorid_solve(model, tokenizer, questions, adapters=ADAPTER_NAMES, prompts=PROMPTS,
                           max_iterations=settings.max_iterations, temperature=settings.temperature,
                           top_p=settings.top_p, max_new_tokens=max_new, seed=settings.seed, on_iteration=report)
    labels = [p.answer for p in test]
    loop = loop_accuracy(outcomes, labels)
    iterations = mean_iterations(outcomes)
    unresolved = sum(not o.resolved for o in outcomes) / len(outcomes)
    sampled = {"IR, one sample": _share([o.intuitive_answers[0] for o in outcomes], test),
               "KG + DR, one sample": _share([o.deep_answers[0] for o in outcomes], test)}
    by_budget = [sum(o.resolved and o.iterations <= t and any(answers_match(a, p.answer) for a in o.agreed)
                     for o, p in zip(outcomes, test, strict=True)) / len(test)
                 for t in range(1, settings.max_iterations + 1)]

    metrics = {
        "student_accuracy": alone["student without adapters"], "ir_accuracy": alone["IR alone"],
        "dr_accuracy": alone["KG + DR alone"], "dr_gold_accuracy": alone["DR, gold knowledge"],
        "kg_accuracy": knowledge_accuracy, "loop_accuracy": loop, "mean_iterations": iterations,
        "unresolved_fraction": unresolved, "ir_sample_accuracy": sampled["IR, one sample"],
        "dr_sample_accuracy": sampled["KG + DR, one sample"],
        "adapter_parameters": float(count_parameters(model, "ir")),
    }
    figures = {
        "accuracy": bar_plot([*alone, *sampled, f"LoRID loop (T={settings.max_iterations})"],
                             [*alone.values(), *sampled.values(), loop], title="Test accuracy on word problems",
                             xlabel="", ylabel="accuracy"),
        "accuracy_by_budget": line_plot(
            {"LoRID loop": (list(range(1, settings.max_iterations + 1)), by_budget)},
            hlines={"IR alone": alone["IR alone"], "KG + DR alone": alone["KG + DR alone"]}, ylim=(0.0, 1.02),
            title="Loop accuracy with at most T iterations", xlabel="T (max iterations)", ylabel="accuracy"),
        "iterations": _iteration_histogram(outcomes, settings.max_iterations, iterations),
    }
    rows = [{"module": label, "accuracy": round(value, 4)} for label, value in {**alone, **sampled}.items()]
    rows.append({"module": f"LoRID loop (T={settings.max_iterations})", "accuracy": round(loop, 4)})
    examples = [{"question": p.question, "gold knowledge": g, "KG (greedy)": k.strip(),
                 "IR (greedy)": PROMPTS.extract(i), "KG + DR (greedy)": PROMPTS.extract(d),
                 "loop answer": o.answer or "none", "iterations": o.iterations, "answer": p.answer}
                for p, g, k, i, d, o in list(zip(test, gold, knowledge, intuitive, deep, outcomes, strict=True))[:12]]
    best_alone = max(alone["IR alone"], alone["KG + DR alone"])
    summary = (
        f"Three rank-{settings.rank} LoRAs ({metrics['adapter_parameters']:,.0f} parameters each) on one student "
        f"solve {settings.reasoning_steps}-step word problems. Alone (greedy), the intuitive reasoner gets "
        f"{alone['IR alone']:.0%} right, the deep reasoner {alone['KG + DR alone']:.0%} with the knowledge "
        f"generator's operations ({knowledge_accuracy:.0%} exactly right) and {alone['DR, gold knowledge']:.0%} with "
        f"the teacher's; one sample of each at temperature {settings.temperature:g}, top-p {settings.top_p:g} gets "
        f"{sampled['IR, one sample']:.0%} and {sampled['KG + DR, one sample']:.0%}. Sampling both until they agree, "
        f"the LoRID loop gets **{loop:.0%}** right ({'above' if loop > best_alone else 'not above'} the better "
        f"greedy module) after {iterations:.1f} iterations on average; {unresolved:.0%} of the questions never "
        f"agree within T = {settings.max_iterations} and count as wrong."
    )
    return LabResult(method="lorid", summary=summary, metrics=metrics,
                     tables={"accuracy": rows, "examples": examples}, figures=figures, settings=settings.to_dict())


def _iteration_histogram(outcomes, max_iterations: int, mean: float):
    counts = Counter(o.iterations for o in outcomes if o.resolved)
    labels = [str(t) for t in range(1, max_iterations + 1)] + ["never"]
    values = [counts.get(t, 0) for t in range(1, max_iterations + 1)] + [sum(not o.resolved for o in outcomes)]
    figure = bar_plot(labels, values, title=f"Iteration at which the reasoners agreed (mean {mean:.1f})",
                      xlabel="iteration", ylabel="questions", annotate=max_iterations <= 20)
    return figure


register_experiment(Experiment(
    method="lorid", settings_cls=LoRIDSettings, run=run,
    description="A tiny student learns word problems from a teacher's rationales and knowledge with three LoRAs: "
                "an intuitive reasoner, a knowledge generator and a deep reasoner. Look at the accuracy of each "
                "alone against the consistency loop, which samples both reasoners until they agree, and at how "
                "many iterations that takes.",
))
