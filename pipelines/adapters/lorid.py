"""LoRID: three LoRAs on one student model and the consistency loop between them at inference.

Li, Liu and Wang, "Can Large Models Teach Student Models to Solve Mathematical Problems Like Human Beings? A
Reasoning Distillation Method via Multi-LoRA Interaction", IJCAI 2025 (arXiv 2508.13037). Official code
Xinhe-Li/LoRID (`src/train.py`, `src/predict.py`, `src/hparams/*`, the `examples/*/predict.sh` scripts and the
LLaMA-Factory it drives); this module follows that code. The paper's own text was not read here.

Three ordinary LoRA adapters share one frozen student:

- the intuitive reasoner (IR, "System 1"): question -> rationale and answer;
- the knowledge generator (KG): question -> the knowledge (general solving rules) the question needs;
- the deep reasoner (DR, "System 2"): question and knowledge -> rationale and answer (trained with the teacher's
  knowledge, run on the KG's).

At inference, for t = 1 .. T the IR answers the question, the KG writes knowledge and the DR answers from it,
each by sampling; the answers of every iteration so far are collected in two sets (empty answers left out), and
the loop stops at the first t where the IR's and the DR's sets share an answer. A question whose sets never meet
within T iterations counts as wrong. `consistency_loop` runs that rule on any sampler (a function from role and
prompts to texts); `lorid_solve` runs it on a causal LM carrying the three adapters.

Defaults from the official code: LoRA rank 512, alpha 1024, dropout 0.1 on `q_proj` and `v_proj` (the
`train_*.sh` scripts; PEFT's initialisation, B at zero); the three official prompts (instruction, then a newline,
then the input, as LLaMA-Factory joins them) with the GSM8K answer format `rationale\\n--> answer END`; the loss on
the response only; at inference temperature 1.5, top-p 0.9 for all three modules (`predict.sh`), and top-k 50,
no repetition penalty, up to 1,024 new tokens (the defaults of LLaMA-Factory's `vllm_infer.py`, which the official
code calls without overriding them); T = 20 (`max_iterations`). Answers are read as the official parser does:
the text between `-->` and `END`, else the last number in the text, then cleaned up (`clean_answer`: "$18.00" and
"18" are the same answer, in the agreement sets too).

Choices left open by the code, each a parameter:
- The official evaluation generates all T samples of every module first and finds the stopping iteration
  afterwards; `consistency_loop` samples iteration by iteration and stops sampling a question once it is
  resolved, which gives the same outcomes for the same samples at less cost.
- When the two sets share several answers at the stopping iteration, the official scorer counts the question
  right if any of them is right (`count_any_agreed=True` in `loop_accuracy`); `LoRIDOutcome.answer` is the shared
  answer the IR gave first, the one a user without labels would get.
- Answers are compared as numbers when both parse (relative tolerance 1e-4, as the official `math_equal`), else
  as stripped strings; the official symbolic (LaTeX / sympy) comparison for MATH is not reproduced.
- Temperature, top-p and top-k may differ per module (the official script has one setting per module); pass a
  mapping from role to value.
- The KG's generated text goes into the DR's prompt as it is, as in the official code.
- The official code merges each LoRA into its own copy of the model; here the three live on one model and
  `set_active` chooses between them, which computes the same thing.
- Training hyperparameters (lr 5e-5, 5 epochs, cosine schedule, warm-up 0.03, batch 16) are the trainer's, not
  the adapter's; the lab experiment states what it uses on its tiny model.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipelines.adapters._peft_lora import PeftLoRALinear
from pipelines.adapters.core import (
    AdapterConfig,
    AdapterError,
    active_adapters,
    adapter_config,
    adapter_names,
    register_method,
    set_active,
)
from pipelines.adapters.fields import check_choice, check_int, check_number

INTUITIVE, KNOWLEDGE, DEEP = "intuitive_reasoner", "knowledge_generator", "deep_reasoner"
ROLES = (INTUITIVE, KNOWLEDGE, DEEP)
MAX_ITERATIONS = 20
TEMPERATURE = 1.5
TOP_P = 0.9
TOP_K = 50
MAX_NEW_TOKENS = 1024


@dataclass
class LoRIDConfig(AdapterConfig):
    """One of LoRID's three LoRAs: its `role` and the LoRA's rank, alpha and dropout (official: 512, 1024, 0.1)."""

    method = "lorid"

    role: str = field(default=INTUITIVE, metadata={
        "help": "which module this LoRA is: intuitive_reasoner, knowledge_generator or deep_reasoner",
        "choices": list(ROLES)})
    rank: int = field(default=512, metadata={"help": "LoRA rank r (official: 512)"})
    alpha: float = field(default=1024.0, metadata={"help": "the update is multiplied by alpha / r (official: 1024)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the LoRA branch's input (official: 0.1)"})

    def validate(self) -> None:
        check_choice("LoRID", "role", self.role, ROLES)
        check_int("LoRID", "rank", self.rank)
        check_number("LoRID", "alpha", self.alpha, 0.0, low_open=True)
        check_number("LoRID", "dropout", self.dropout, 0.0, 1.0, high_open=True)


class LoRIDLinear(PeftLoRALinear):
    """A plain LoRA branch (PEFT's initialisation) tagged with its LoRID role."""

    def __init__(self, base_layer: nn.Module, config: LoRIDConfig | None = None,
                 adapter_name: str = "default") -> None:
        config = config or LoRIDConfig()
        super().__init__(base_layer, config.rank, config.alpha, config.dropout, adapter_name)
        self.role = config.role


LoRIDConfig.layer_cls = LoRIDLinear


# -- prompts and answers --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRIDPrompts:
    """How questions, knowledge, rationales and answers become the three modules' prompts and targets.

    Templates hold `{question}`, `{knowledge}`, `{rationale}` and `{answer}` (filled by plain replacement, so
    braces inside a question are safe). The defaults are the official GSM8K prompts: the instruction, a newline
    (LLaMA-Factory's join of instruction and input), then the input; a chat template, if the student has one,
    goes around them as the user's own. `answer_pattern` has one group, the answer inside a generated solution;
    `clean_answers` applies `clean_answer` to what it finds (the official parser does; off, answers are compared as
    written).
    """

    intuitive: str = "Please answer this MATH question step by step.\n{question}"
    knowledge: str = ("Please output knowledge needed to solve the MATH question step by step.\n"
                      "Question: {question}\n\nKnowledge: ")
    deep: str = ("Please reason step by step based on the given MATH question and knowledge, and output the final "
                 "answer.\nQuestion: {question}\n\nKnowledge: {knowledge}\n\nRationale: ")
    solution: str = "{rationale}\n--> {answer} END"
    knowledge_separator: str = "\n"
    answer_pattern: str = r"-->\s*(.*?)\s*END"
    clean_answers: bool = True

    def __post_init__(self) -> None:
        needs = {"intuitive": ("{question}",), "knowledge": ("{question}",), "deep": ("{question}", "{knowledge}"),
                 "solution": ("{rationale}", "{answer}")}
        for name, fields in needs.items():
            template = getattr(self, name)
            if not isinstance(template, str):
                raise AdapterError(f"LoRID prompt {name} must be a string")
            for wanted in fields:
                if wanted not in template:
                    raise AdapterError(f"LoRID prompt {name} must contain {wanted}")
        try:
            groups = re.compile(self.answer_pattern).groups
        except (re.error, TypeError) as exc:
            raise AdapterError(f"LoRID answer_pattern is not a valid regular expression ({exc})") from None
        if groups != 1:
            raise AdapterError("LoRID answer_pattern must have exactly one group (the answer)")
        if not isinstance(self.clean_answers, bool):
            raise AdapterError("LoRID clean_answers must be true or false")

    def prompt(self, role: str, question: str, knowledge: str = "") -> str:
        """The prompt of module `role` for `question` (the deep reasoner's with `knowledge`)."""
        template = {INTUITIVE: self.intuitive, KNOWLEDGE: self.knowledge, DEEP: self.deep}[_check_role(role)]
        return template.replace("{knowledge}", knowledge).replace("{question}", question)

    def knowledge_text(self, items: Sequence[str]) -> str:
        return self.knowledge_separator.join(items)

    def solution_text(self, rationale: str, answer: str) -> str:
        return self.solution.replace("{rationale}", rationale).replace("{answer}", answer)

    def training_pair(self, role: str, question: str, rationale: str, answer: str,
                      knowledge: Sequence[str]) -> tuple[str, str]:
        """(prompt, target) of one training example of module `role`; the DR sees the teacher's knowledge."""
        role = _check_role(role)
        if role == KNOWLEDGE:
            return self.prompt(role, question), self.knowledge_text(knowledge)
        return self.prompt(role, question, self.knowledge_text(knowledge)), self.solution_text(rationale, answer)

    def extract(self, text: str) -> str:
        """The answer in a generated solution: the pattern's group, else the last number, else ""; then, with
        `clean_answers`, the official parser's clean-up of it (`clean_answer`), so "$18.00" and "18" agree."""
        match = re.search(self.answer_pattern, text, re.DOTALL)
        if match:
            answer = match.group(1).strip()
        else:
            numbers = re.findall(r"-?\d*\.?\d+", text.replace(",", ""))
            answer = numbers[-1] if numbers else ""
        return clean_answer(answer) if self.clean_answers else answer


def clean_answer(answer: str) -> str:
    """The parts of the official parser's answer clean-up (`extract_answer` and `strip_string`) that concern plain
    answers: line breaks and spaces removed, a leading ":" and trailing "." or "/" dropped, `\\text{...}` unwrapped,
    dollar and percent signs removed, a short `x = ` in front dropped, trailing zeros after a decimal point cut
    ("18.00" -> "18") and a leading "." given its 0. Its unit words, number words and LaTeX rewriting (fractions,
    square roots, matrices) are not reproduced."""
    text = re.sub(r"\n\s*", "", answer).strip()
    if text.startswith(":"):
        text = text[1:]
    text = text.rstrip(".").rstrip("/").strip().rstrip(".")
    text = re.sub(r"\\text\{(.*?)\}", r"\1", text)
    for sign in ("\\$", "$", "\\%", "%"):
        text = text.replace(sign, "")
    if text.startswith("."):
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0].strip()) <= 2:
        text = sides[1]
    text = re.sub(r"(\d+)\.0*([^\d])", r"\1\2", text)
    text = re.sub(r"(\d+)\.0*$", r"\1", text)
    return text.replace(" ", "")


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise AdapterError(f"LoRID role must be one of {', '.join(ROLES)}, not {role!r}")
    return role


def answers_match(answer: str, label: str) -> bool:
    """Numbers compared with relative tolerance 1e-4 (the official `math_equal`), anything else as text."""
    a, b = answer.strip(), label.strip()
    try:
        x, y = float(a.replace(",", "")), float(b.replace(",", ""))
    except ValueError:
        return a == b
    return math.isclose(x, y, rel_tol=1e-4)


# -- the consistency loop -------------------------------------------------------------------------------------

Sampler = Callable[[str, list[str]], list[str]]  # (role, prompts) -> one generated text per prompt


@dataclass
class LoRIDOutcome:
    """One question through the loop: the agreed answers, how many iterations it took, and every sample."""

    answer: str  # the shared answer the IR gave first; "" when the sets never met
    agreed: tuple[str, ...]  # every answer the two sets shared at the stopping iteration
    iterations: int  # the stopping iteration, or T when they never met
    intuitive_answers: list[str] = field(default_factory=list)  # one per iteration ("" when none was found)
    deep_answers: list[str] = field(default_factory=list)
    knowledge: list[str] = field(default_factory=list)

    @property
    def resolved(self) -> bool:
        return bool(self.agreed)


def consistency_loop(sample: Sampler, questions: Sequence[str], *, prompts: LoRIDPrompts | None = None,
                     max_iterations: int = MAX_ITERATIONS,
                     on_iteration: Callable[[int, int], None] | None = None) -> list[LoRIDOutcome]:
    """Run LoRID's inference loop over `questions` with `sample(role, prompts) -> texts`.

    Each iteration asks, for every question not yet resolved, the intuitive reasoner for a solution, the
    knowledge generator for knowledge, and the deep reasoner for a solution from that knowledge (the same
    iteration's). A question is resolved at the first iteration where the answers the IR gave so far and those
    the DR gave so far share one; after `max_iterations` without that it is unresolved (counted wrong).
    `on_iteration(t, pending)` is called before each iteration with the number of questions still open.
    """
    prompts = prompts or LoRIDPrompts()
    check_int("LoRID", "max_iterations", max_iterations)
    questions = list(questions)
    seen_ir: list[list[str]] = [[] for _ in questions]
    seen_dr: list[list[str]] = [[] for _ in questions]
    outcomes = [LoRIDOutcome(answer="", agreed=(), iterations=max_iterations) for _ in questions]
    pending = list(range(len(questions)))
    for t in range(1, max_iterations + 1):
        if not pending:
            break
        if on_iteration is not None:
            on_iteration(t, len(pending))
        asked = [questions[i] for i in pending]
        intuitive = _sample_checked(sample, INTUITIVE, [prompts.prompt(INTUITIVE, q) for q in asked])
        knowledge = _sample_checked(sample, KNOWLEDGE, [prompts.prompt(KNOWLEDGE, q) for q in asked])
        deep = _sample_checked(sample, DEEP, [prompts.prompt(DEEP, q, k) for q, k in zip(asked, knowledge,
                                                                                            strict=True)])
        still = []
        for i, ir_text, kg_text, dr_text in zip(pending, intuitive, knowledge, deep, strict=True):
            outcome = outcomes[i]
            ir_answer, dr_answer = prompts.extract(ir_text), prompts.extract(dr_text)
            outcome.intuitive_answers.append(ir_answer)
            outcome.deep_answers.append(dr_answer)
            outcome.knowledge.append(kg_text)
            for answer, seen in ((ir_answer, seen_ir[i]), (dr_answer, seen_dr[i])):
                if answer and answer not in seen:
                    seen.append(answer)
            shared = tuple(a for a in seen_ir[i] if a in seen_dr[i])
            if shared:
                outcome.answer, outcome.agreed, outcome.iterations = shared[0], shared, t
            else:
                still.append(i)
        pending = still
    return outcomes


def _sample_checked(sample: Sampler, role: str, prompts: list[str]) -> list[str]:
    texts = list(sample(role, prompts))
    if len(texts) != len(prompts) or not all(isinstance(t, str) for t in texts):
        raise AdapterError(f"the LoRID sampler must return one text per prompt for {role} "
                           f"({len(prompts)} prompts, got {len(texts)} results)")
    return texts


def loop_accuracy(outcomes: Sequence[LoRIDOutcome], labels: Sequence[str], *, count_any_agreed: bool = True) -> float:
    """The share of questions answered right: with `count_any_agreed` (official) a question is right if any
    answer the two sets shared is right, else only if `outcome.answer` is; unresolved questions are wrong."""
    if len(outcomes) != len(labels) or not outcomes:
        raise AdapterError("loop_accuracy needs one label per outcome, and at least one")
    right = 0
    for outcome, label in zip(outcomes, labels, strict=True):
        candidates = outcome.agreed if count_any_agreed else (outcome.answer,) if outcome.answer else ()
        right += any(answers_match(a, label) for a in candidates)
    return right / len(outcomes)


def mean_iterations(outcomes: Sequence[LoRIDOutcome]) -> float:
    """The official "average iterations": the stopping iteration, or T for a question never resolved."""
    return sum(o.iterations for o in outcomes) / max(len(outcomes), 1)


# -- sampling from a causal LM ---------------------------------------------------------------------------------


def _token_id(tokenizer: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _decode(tokenizer: Any, ids: list[int]) -> str:
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:  # tokenizers that skip special tokens on their own (the lab's CharTokenizer)
        return tokenizer.decode(ids)


def next_token(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `logits` (rows, vocab): greedy at temperature 0, else sampled from the softmax of
    logits / temperature restricted to the top-k tokens and then to the top-p mass (vLLM's order; the most likely
    token always stays). top_k 0 means no top-k cut."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    ordered, index = logits.sort(dim=-1, descending=False)
    vocab = ordered.shape[-1]
    if 0 < top_k < vocab:
        ordered = ordered.masked_fill(torch.arange(vocab, device=ordered.device) < vocab - top_k, -math.inf)
    if top_p < 1.0:
        cumulative = ordered.softmax(-1).cumsum(-1)
        cut = cumulative <= 1 - top_p
        cut[..., -1] = False
        ordered = ordered.masked_fill(cut, -math.inf)
    choice = torch.multinomial(ordered.softmax(-1), 1, generator=generator)
    return index.gather(-1, choice).squeeze(-1)


def _cache_argument(model: nn.Module) -> str | None:
    """The keyword under which `model.forward` takes a key/value cache, if it also takes position ids."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if "position_ids" not in parameters or "use_cache" not in parameters:
        return None
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


@torch.no_grad()
def sample_texts(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, temperature: float = TEMPERATURE,
                 top_p: float = TOP_P, top_k: int = TOP_K, max_new_tokens: int = MAX_NEW_TOKENS,
                 generator: torch.Generator | None = None, use_cache: bool | None = None) -> list[str]:
    """Continue each prompt with a causal LM (`model(input_ids=..., attention_mask=...)` giving `.logits`) until
    its end-of-sequence token or `max_new_tokens`; return the new text of each.

    `tokenizer` needs `encode(text) -> ids` and `decode(ids)` (a transformers tokenizer or the lab's
    CharTokenizer). With `use_cache` (the default where `model.forward` takes position ids and a key/value cache,
    as transformers' causal LMs do) the prompts are left-padded and each step feeds one token per row; otherwise
    the batch is right-padded and recomputed in full at every step, which works on any causal LM.
    """
    _check_sampling(temperature, top_p, top_k, max_new_tokens)
    eos = _token_id(tokenizer, "eos_token_id", "eos_id")
    pad = _token_id(tokenizer, "pad_token_id", "pad_id")
    pad = 0 if pad is None else pad
    encoded = [list(tokenizer.encode(p)) for p in prompts]
    if not encoded:
        return []
    if any(not ids for ids in encoded):
        raise AdapterError("every LoRID prompt must encode to at least one token")
    cache_argument = _cache_argument(model)
    if use_cache is None:
        use_cache = cache_argument is not None
    elif use_cache and cache_argument is None:
        raise AdapterError(f"{type(model).__name__}.forward takes no position ids and key/value cache; "
                           "sample with use_cache=False")
    was_training = model.training
    model.eval()
    try:
        step = _CachedSteps(model, cache_argument) if use_cache else _FullSteps(model)
        generated = step.run(encoded, pad, eos, max_new_tokens,
                             lambda logits: next_token(logits, temperature, top_p, top_k, generator))
    finally:
        model.train(was_training)
    return [_decode(tokenizer, ids) for ids in generated]


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


class _FullSteps:
    """Right-padded rows, the whole batch recomputed at every step (any causal LM)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def run(self, encoded: list[list[int]], pad: int, eos: int | None, max_new_tokens: int,
            choose: Callable[[torch.Tensor], torch.Tensor]) -> list[list[int]]:
        device = next(self.model.parameters()).device
        lengths = torch.tensor([len(ids) for ids in encoded])
        ids = torch.full((len(encoded), int(lengths.max()) + max_new_tokens), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(encoded):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        starts = lengths.clone()
        open_rows = torch.arange(len(encoded))
        for _ in range(max_new_tokens):
            if len(open_rows) == 0:
                break
            span = int(lengths[open_rows].max())
            logits = _logits(self.model(input_ids=ids[open_rows, :span].to(device),
                                        attention_mask=mask[open_rows, :span].to(device)))
            chosen = choose(logits[torch.arange(len(open_rows)), lengths[open_rows] - 1].cpu())
            ids[open_rows, lengths[open_rows]] = chosen
            mask[open_rows, lengths[open_rows]] = 1
            lengths[open_rows] += 1
            if eos is not None:
                open_rows = open_rows[chosen != eos]
        return [_without_eos(ids[row, int(starts[row]):int(lengths[row])].tolist(), eos) for row in range(len(encoded))]


class _CachedSteps:
    """Left-padded rows with explicit position ids; after the prompt, one new token per row and step."""

    def __init__(self, model: nn.Module, cache_argument: str) -> None:
        self.model = model
        self.cache_argument = cache_argument

    def run(self, encoded: list[list[int]], pad: int, eos: int | None, max_new_tokens: int,
            choose: Callable[[torch.Tensor], torch.Tensor]) -> list[list[int]]:
        device = next(self.model.parameters()).device
        width = max(len(seq) for seq in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(encoded):
            ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                         position_ids=positions.to(device), use_cache=True)
        next_position = positions[:, -1:] + 1
        generated: list[list[int]] = [[] for _ in encoded]
        done = torch.zeros(len(encoded), dtype=torch.bool)
        for step in range(max_new_tokens):
            chosen = choose(_logits(out)[:, -1].cpu())
            for row in (~done).nonzero().flatten().tolist():
                generated[row].append(int(chosen[row]))
            if eos is not None:
                done |= chosen == eos
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(len(encoded), 1, dtype=mask.dtype)], dim=1)
            cache = getattr(out, self.cache_argument, None)
            if cache is None:
                cache = getattr(out, "past_key_values", None)
            out = self.model(input_ids=chosen[:, None].to(device), attention_mask=mask.to(device),
                             position_ids=next_position.to(device), use_cache=True, **{self.cache_argument: cache})
            next_position = next_position + 1
        return [_without_eos(ids, eos) for ids in generated]


def _without_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[:-1] if eos is not None and ids and ids[-1] == eos else ids


def _check_sampling(temperature: float, top_p: float, top_k: int, max_new_tokens: int) -> None:
    check_number("LoRID", "temperature", temperature, 0.0)
    check_number("LoRID", "top_p", top_p, 0.0, 1.0, low_open=True)
    check_int("LoRID", "top_k", top_k, minimum=0)
    check_int("LoRID", "max_new_tokens", max_new_tokens)


def _per_role(value: float | int | Mapping[str, float | int], name: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(ROLES))
        missing = sorted(set(ROLES) - set(value))
        if unknown or missing:
            raise AdapterError(f"LoRID {name} per role must name exactly {', '.join(ROLES)}")
        return dict(value)
    return dict.fromkeys(ROLES, value)


def lorid_adapters(model: nn.Module) -> dict[str, str]:
    """{role: adapter name} of the LoRID adapters in `model`; one clear error if a role is missing or doubled."""
    found: dict[str, list[str]] = {role: [] for role in ROLES}
    for name in adapter_names(model):
        try:
            config = adapter_config(model, name)
        except AdapterError:
            continue
        if isinstance(config, LoRIDConfig):
            found[config.role].append(name)
    for role, names in found.items():
        if not names:
            raise AdapterError(f"the model has no LoRID adapter with role {role}; LoRID needs exactly one per role")
        if len(names) > 1:
            raise AdapterError(f"the model has {len(names)} LoRID adapters with role {role} ({', '.join(names)}); "
                               "name the three to use with adapters=")
    return {role: names[0] for role, names in found.items()}


def adapter_sampler(model: nn.Module, tokenizer: Any, adapters: Mapping[str, str], *,
                    temperature: float | Mapping[str, float] = TEMPERATURE,
                    top_p: float | Mapping[str, float] = TOP_P, top_k: int | Mapping[str, int] = TOP_K,
                    max_new_tokens: int = MAX_NEW_TOKENS, generator: torch.Generator | None = None) -> Sampler:
    """A sampler for `consistency_loop`: role -> `set_active(model, adapters[role])`, then `sample_texts`."""
    if not isinstance(adapters, Mapping):
        raise AdapterError("LoRID adapters must map each role to an adapter name")
    adapters = _per_role(adapters, "adapters")
    present = adapter_names(model)
    for role, name in adapters.items():
        if name not in present:
            raise AdapterError(f"the model has no adapter named {name!r} for the {role}")
    settings = {key: _per_role(value, key) for key, value in
                (("temperature", temperature), ("top_p", top_p), ("top_k", top_k))}
    for role in ROLES:
        _check_sampling(settings["temperature"][role], settings["top_p"][role], settings["top_k"][role],
                        max_new_tokens)

    def sample(role: str, prompts: list[str]) -> list[str]:
        set_active(model, [adapters[role]])
        return sample_texts(model, tokenizer, prompts, temperature=settings["temperature"][role],
                            top_p=settings["top_p"][role], top_k=settings["top_k"][role],
                            max_new_tokens=max_new_tokens, generator=generator)

    return sample


def lorid_solve(model: nn.Module, tokenizer: Any, questions: Sequence[str], *,
                adapters: Mapping[str, str] | None = None, prompts: LoRIDPrompts | None = None,
                max_iterations: int = MAX_ITERATIONS, temperature: float | Mapping[str, float] = TEMPERATURE,
                top_p: float | Mapping[str, float] = TOP_P, top_k: int | Mapping[str, int] = TOP_K,
                max_new_tokens: int = MAX_NEW_TOKENS, seed: int | None = None,
                on_iteration: Callable[[int, int], None] | None = None) -> list[LoRIDOutcome]:
    """LoRID's consistency loop on a causal LM carrying the three adapters.

    `adapters` maps each role (`intuitive_reasoner`, `knowledge_generator`, `deep_reasoner`) to an adapter
    name; by default the model's LoRID adapters are found by their configs' roles (any LoRA-like adapters work
    when named here). `seed` seeds the sampling generator. The adapters active before are active again after.
    """
    check_int("LoRID", "max_iterations", max_iterations)
    adapters = dict(adapters) if adapters is not None else lorid_adapters(model)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    sample = adapter_sampler(model, tokenizer, adapters, temperature=temperature, top_p=top_p, top_k=top_k,
                             max_new_tokens=max_new_tokens, generator=generator)
    before = active_adapters(model)
    try:
        return consistency_loop(sample, questions, prompts=prompts, max_iterations=max_iterations,
                                on_iteration=on_iteration)
    finally:
        set_active(model, before)


register_method(
    "lorid", LoRIDConfig, title="LoRID",
    paper="Li, Liu and Wang, Can Large Models Teach Student Models to Solve Mathematical Problems Like Human "
          "Beings? A Reasoning Distillation Method via Multi-LoRA Interaction, IJCAI 2025 (arXiv 2508.13037)",
    property="three LoRAs on one student (intuitive reasoner, knowledge generator, deep reasoner); answering "
             "only when the intuitive and the deep reasoner agree beats either alone",
)
