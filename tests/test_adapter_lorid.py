"""LoRID: the LoRA branch, the official prompts and answer parser, the sampler, and the consistency loop's rule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipelines.adapters import (
    AdapterError,
    LoRIDConfig,
    LoRIDPrompts,
    active_adapters,
    add_adapter,
    consistency_loop,
    layers_of,
    loop_accuracy,
    lorid_adapters,
    lorid_solve,
    set_active,
)
from pipelines.adapters.lorid import DEEP, INTUITIVE, KNOWLEDGE, mean_iterations, next_token, sample_texts
from pipelines.lab.data import CharTokenizer

# -- the LoRA branch --------------------------------------------------------------------------------------------


def test_branch_adds_alpha_over_rank_times_b_a_x():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    model = nn.Sequential(base)
    add_adapter(model, LoRIDConfig(rank=3, alpha=12.0, dropout=0.1, target_modules=["0"]))
    layer = layers_of(model)["0"][0]
    with torch.no_grad():
        layer.lora_B.normal_()
    model.eval()  # dropout off
    x = torch.randn(4, 6)
    expected = x @ base.weight.T + base.bias + (12.0 / 3) * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(model(x), expected)


def test_branch_starts_as_peft_does():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8))
    add_adapter(model, LoRIDConfig(rank=4, target_modules=["0"]))
    layer = layers_of(model)["0"][0]
    assert torch.equal(layer.lora_B, torch.zeros(8, 4))
    bound = 1 / math.sqrt(64)  # Kaiming-uniform with a = sqrt(5)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    assert layer.role == INTUITIVE


def test_official_defaults():
    config = LoRIDConfig(target_modules=["q_proj", "v_proj"])
    assert (config.rank, config.alpha, config.dropout, config.role) == (512, 1024.0, 0.1, INTUITIVE)


@pytest.mark.parametrize("field, value, message", [
    ("role", "teacher", "role"), ("rank", 0, "rank"), ("alpha", float("nan"), "alpha"), ("dropout", 1.0, "dropout"),
    ("rank", True, "rank"),
])
def test_bad_config_is_refused(field, value, message):
    with pytest.raises(AdapterError, match=message):
        LoRIDConfig(**{field: value}, target_modules=["q_proj"])


# -- prompts and answers --------------------------------------------------------------------------------------


def test_official_prompts_join_instruction_and_input_with_a_newline():
    prompts = LoRIDPrompts()
    q, k = "Tom has 3 apples.", ("Add the counts.", "Subtract what is eaten.")
    ir = prompts.training_pair(INTUITIVE, q, "3 + 1 = 4", "4", k)
    assert ir == ("Please answer this MATH question step by step.\nTom has 3 apples.", "3 + 1 = 4\n--> 4 END")
    kg = prompts.training_pair(KNOWLEDGE, q, "3 + 1 = 4", "4", k)
    assert kg == ("Please output knowledge needed to solve the MATH question step by step.\nQuestion: Tom has 3 apples."
                  "\n\nKnowledge: ", "Add the counts.\nSubtract what is eaten.")
    dr = prompts.training_pair(DEEP, q, "3 + 1 = 4", "4", k)
    assert dr[0] == ("Please reason step by step based on the given MATH question and knowledge, and output the final "
                     "answer.\nQuestion: Tom has 3 apples.\n\nKnowledge: Add the counts.\nSubtract what is eaten."
                     "\n\nRationale: ")
    assert dr[1] == ir[1]


def test_braces_in_a_question_are_kept():
    assert LoRIDPrompts().prompt(DEEP, "x = {knowledge}?", "k").endswith("Question: x = {knowledge}?\n\nKnowledge: k"
                                                                        "\n\nRationale: ")


@pytest.mark.parametrize("text, answer", [
    ("3 + 4 = 7\n--> 7 END", "7"), ("so -->  12.5   END and more", "12.5"), ("first 3 then 1,250", "1250"),
    ("no number here", ""), ("--> x END", "x"),
])
def test_answers_are_read_as_the_official_parser_does(text, answer):
    assert LoRIDPrompts().extract(text) == answer


@pytest.mark.parametrize("text, answer", [
    ("--> $18.00 END", "18"), ("--> 50% END", "50"), ("--> x = 5. END", "5"), ("--> .5 END", "0.5"),
    ("--> \\text{12} END", "12"), ("-->\n: 1 200 END", "1200"), ("--> 12.05 END", "12.05"), ("--> 7,5 END", "7,5"),
])
def test_answers_are_cleaned_up_as_the_official_parser_does(text, answer):
    assert LoRIDPrompts().extract(text) == answer
    assert LoRIDPrompts(clean_answers=False).extract(text) == text[3:-3].strip()


def test_answers_written_differently_agree_in_the_loop():
    scripts = {"q": {INTUITIVE: ["$18.00"], DEEP: ["18"], KNOWLEDGE: ["k"]}}
    [outcome] = consistency_loop(ScriptedModel(scripts), ["q"], max_iterations=1)
    assert outcome.resolved and outcome.answer == "18"
    raw = LoRIDPrompts(clean_answers=False)
    [outcome] = consistency_loop(ScriptedModel(scripts), ["q"], prompts=raw, max_iterations=1)
    assert not outcome.resolved


def test_prompts_missing_a_field_are_refused():
    with pytest.raises(AdapterError, match="knowledge"):
        LoRIDPrompts(deep="Q: {question}")
    with pytest.raises(AdapterError, match="one group"):
        LoRIDPrompts(answer_pattern=r"-->.*END")


# -- the consistency loop on a scripted model -------------------------------------------------------------------


class ScriptedModel:
    """A stand-in for the three LoRAs: per question, a script of what each role answers at each iteration."""

    def __init__(self, scripts: dict[str, dict[str, list[str]]]) -> None:
        self.scripts = scripts
        self.calls: list[tuple[str, list[str]]] = []
        self.turn: dict[tuple[str, str], int] = {}

    def __call__(self, role: str, prompts: list[str]) -> list[str]:
        self.calls.append((role, prompts))
        out = []
        for prompt in prompts:
            question = next(q for q in self.scripts if q in prompt)
            key = (role, question)
            t = self.turn.get(key, 0)
            self.turn[key] = t + 1
            reply = self.scripts[question][role][t]
            out.append(reply if role == KNOWLEDGE else f"steps\n--> {reply} END" if reply else "I cannot tell")
        return out


def _scripts(ir: list[str], dr: list[str], kg: list[str] | None = None) -> dict[str, list[str]]:
    return {INTUITIVE: ir, DEEP: dr, KNOWLEDGE: kg or [f"k{t}" for t in range(len(ir))]}


def test_loop_stops_at_the_first_iteration_where_the_answer_sets_meet():
    # IR: 3, 5; DR: 5, ... -> at t=1 the sets {3} and {5} do not meet; at t=2 {3, 5} and {5, 9} share 5.
    model = ScriptedModel({"q1": _scripts(["3", "5", "7"], ["5", "9", "7"])})
    [outcome] = consistency_loop(model, ["q1"], max_iterations=3)
    assert outcome.iterations == 2 and outcome.agreed == ("5",) and outcome.answer == "5"
    assert outcome.intuitive_answers == ["3", "5"] and outcome.deep_answers == ["5", "9"]
    assert [role for role, _ in model.calls] == [INTUITIVE, KNOWLEDGE, DEEP] * 2


def test_an_answer_from_an_earlier_iteration_counts():
    model = ScriptedModel({"q": _scripts(["4", "1", "2"], ["6", "6", "4"])})
    [outcome] = consistency_loop(model, ["q"], max_iterations=3)
    assert outcome.iterations == 3 and outcome.answer == "4"


def test_no_agreement_within_t_counts_as_wrong_after_t_iterations():
    model = ScriptedModel({"q": _scripts(["1", "2", "3"], ["4", "5", "6"])})
    [outcome] = consistency_loop(model, ["q"], max_iterations=3)
    assert not outcome.resolved and outcome.answer == "" and outcome.iterations == 3
    assert loop_accuracy([outcome], ["1"]) == 0.0
    assert mean_iterations([outcome]) == 3


def test_empty_answers_never_agree():
    model = ScriptedModel({"q": _scripts(["", "2"], ["", "2"])})
    [outcome] = consistency_loop(model, ["q"], max_iterations=2)
    assert outcome.iterations == 2 and outcome.answer == "2"


def test_the_deep_reasoner_reads_the_same_iterations_knowledge():
    model = ScriptedModel({"q": _scripts(["1", "2"], ["3", "2"], kg=["add first", "subtract then"])})
    consistency_loop(model, ["q"], max_iterations=2)
    deep_prompts = [prompts[0] for role, prompts in model.calls if role == DEEP]
    assert "Knowledge: add first\n" in deep_prompts[0] and "Knowledge: subtract then\n" in deep_prompts[1]


def test_a_resolved_question_is_not_sampled_again():
    model = ScriptedModel({"qa": _scripts(["1", "x", "x"], ["1", "x", "x"]),
                           "qb": _scripts(["1", "2", "3"], ["4", "5", "3"])})
    outcomes = consistency_loop(model, ["qa", "qb"], max_iterations=3)
    assert [o.iterations for o in outcomes] == [1, 3]
    assert all(len(prompts) == 1 for _, prompts in model.calls[3:])
    assert mean_iterations(outcomes) == 2.0
    assert loop_accuracy(outcomes, ["1", "3"]) == 1.0


def test_several_shared_answers_count_as_the_official_scorer_does():
    # At t=2 the sets {1, 2} and {2, 1} share both; the official scorer counts it right if any is right.
    model = ScriptedModel({"q": _scripts(["1", "2"], ["2", "1"])})
    [outcome] = consistency_loop(model, ["q"], max_iterations=2)
    assert set(outcome.agreed) == {"1", "2"} and outcome.answer == "1"
    assert loop_accuracy([outcome], ["2"]) == 1.0
    assert loop_accuracy([outcome], ["2"], count_any_agreed=False) == 0.0


def test_numbers_are_compared_as_numbers():
    model = ScriptedModel({"q": _scripts(["4.0"], ["4.0"])})
    outcomes = consistency_loop(model, ["q"], max_iterations=1)
    assert loop_accuracy(outcomes, ["4"]) == 1.0


def test_a_sampler_returning_the_wrong_count_is_refused():
    with pytest.raises(AdapterError, match="one text per prompt"):
        consistency_loop(lambda role, prompts: [], ["q"], max_iterations=1)


@pytest.mark.parametrize("t", [0, -1, 1.5, True])
def test_bad_iteration_budget_is_refused(t):
    with pytest.raises(AdapterError, match="max_iterations"):
        consistency_loop(lambda role, prompts: ["1"] * len(prompts), ["q"], max_iterations=t)


# -- sampling -----------------------------------------------------------------------------------------------------


def test_next_token_keeps_only_the_top_k_and_then_the_top_p_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    drawn = {int(next_token(logits, 1.0, 1.0, 2, generator)) for _ in range(300)}
    assert drawn == {0, 1}
    # top-p 0.7: ascending cumulative mass 0.05, 0.2, 0.5, 1.0; the tokens at or below 1 - 0.7 = 0.3 go.
    drawn = {int(next_token(logits, 1.0, 0.7, 0, generator)) for _ in range(300)}
    assert drawn == {0, 1}
    drawn = {int(next_token(logits, 1.0, 0.4, 0, generator)) for _ in range(100)}
    assert drawn == {0}
    assert int(next_token(logits, 0.0, 0.9, 50, generator)) == 0


def test_temperature_flattens_the_distribution():
    logits = torch.log(torch.tensor([[0.9, 0.1]])).expand(4000, 2)
    generator = torch.Generator().manual_seed(0)
    cold = (next_token(logits, 1.0, 1.0, 0, generator) == 1).float().mean()
    hot = (next_token(logits, 3.0, 1.0, 0, generator) == 1).float().mean()
    expected_hot = 0.1 ** (1 / 3) / (0.9 ** (1 / 3) + 0.1 ** (1 / 3))
    assert abs(float(cold) - 0.1) < 0.03 and abs(float(hot) - expected_hot) < 0.03


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = CharTokenizer()
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.eval()
    return model, tokenizer


def test_cached_and_full_recompute_sampling_agree():
    model, tokenizer = _tiny_llama()
    prompts = ["ir:has 3,gets 4.>", "kg:a>", "dr:has 9,eats 1.k:sub>"]
    cached = sample_texts(model, tokenizer, prompts, temperature=0.0, max_new_tokens=12, use_cache=True)
    full = sample_texts(model, tokenizer, prompts, temperature=0.0, max_new_tokens=12, use_cache=False)
    assert cached == full and any(cached)
    a = sample_texts(model, tokenizer, prompts, max_new_tokens=12, generator=torch.Generator().manual_seed(3))
    b = sample_texts(model, tokenizer, prompts, max_new_tokens=12, generator=torch.Generator().manual_seed(3))
    assert a == b


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": float("nan")}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_sampling_settings_are_refused(kwargs, message):
    model, tokenizer = _tiny_llama()
    with pytest.raises(AdapterError, match=message):
        sample_texts(model, tokenizer, ["a"], **kwargs)


# -- on a model with three adapters ------------------------------------------------------------------------------


def _three_adapters():
    model, tokenizer = _tiny_llama()
    for i, (role, name) in enumerate(((INTUITIVE, "ir"), (KNOWLEDGE, "kg"), (DEEP, "dr"))):
        torch.manual_seed(i)
        add_adapter(model, LoRIDConfig(role=role, rank=2, alpha=4.0, target_modules=["q_proj", "v_proj"]), name=name)
    return model, tokenizer


def test_adapters_are_found_by_role_and_the_active_ones_come_back():
    model, tokenizer = _three_adapters()
    assert lorid_adapters(model) == {INTUITIVE: "ir", KNOWLEDGE: "kg", DEEP: "dr"}
    set_active(model, ["kg"])
    outcomes = lorid_solve(model, tokenizer, ["has 3.", "has 4,gets 1."], max_iterations=2, max_new_tokens=6, seed=0)
    assert len(outcomes) == 2 and all(1 <= o.iterations <= 2 for o in outcomes)
    assert active_adapters(model) == ["kg"]
    again = lorid_solve(model, tokenizer, ["has 3.", "has 4,gets 1."], max_iterations=2, max_new_tokens=6, seed=0)
    assert [o.intuitive_answers for o in again] == [o.intuitive_answers for o in outcomes]


def test_a_missing_or_doubled_role_is_named():
    model, tokenizer = _tiny_llama()
    add_adapter(model, LoRIDConfig(role=INTUITIVE, rank=2, target_modules=["q_proj"]), name="ir")
    with pytest.raises(AdapterError, match="no LoRID adapter with role knowledge_generator"):
        lorid_adapters(model)
    add_adapter(model, LoRIDConfig(role=INTUITIVE, rank=2, target_modules=["q_proj"]), name="ir2")
    with pytest.raises(AdapterError, match="2 LoRID adapters with role intuitive_reasoner"):
        lorid_adapters(model)


def test_adapters_named_by_hand_must_exist():
    model, tokenizer = _three_adapters()
    with pytest.raises(AdapterError, match="no adapter named 'nope'"):
        lorid_solve(model, tokenizer, ["q"], adapters={INTUITIVE: "ir", KNOWLEDGE: "kg", DEEP: "nope"})
    with pytest.raises(AdapterError, match="exactly"):
        lorid_solve(model, tokenizer, ["q"], adapters={INTUITIVE: "ir"})
