"""The LoRID lab experiment: the consistency loop against one sample of each reasoner, and the word problems."""

from __future__ import annotations

import random

import pytest

from pipelines.adapters.lorid import DEEP, INTUITIVE, KNOWLEDGE
from pipelines.lab import LabSettingsError, run_experiment, settings_from_dict
from pipelines.lab.experiments.lorid import (
    ADD_VERBS,
    PROMPTS,
    SUB_VERBS,
    LoRIDSettings,
    word_problem,
    word_problems,
)
from tests.lab_client import figures_of, record_of, run_panel, tables_of


@pytest.fixture(scope="module")
def result():
    return run_experiment("lorid", LoRIDSettings.quick())


def test_the_loop_beats_one_sample_of_either_reasoner(result):
    """The loop against each reasoner decoded the way the loop decodes (temperature 1.5, top-p 0.9): agreement
    filters the sampled answers. Greedy decoding is a different decoder; the panel shows it beside them."""
    m = result.metrics
    assert m["loop_accuracy"] > m["ir_sample_accuracy"]
    assert m["loop_accuracy"] > m["dr_sample_accuracy"]
    assert 1.0 <= m["mean_iterations"] <= LoRIDSettings.quick().max_iterations


def test_the_three_adapters_learn_their_roles(result):
    m = result.metrics
    assert m["ir_accuracy"] > m["student_accuracy"] + 0.3
    assert m["kg_accuracy"] > 0.5
    assert m["dr_gold_accuracy"] > m["student_accuracy"] + 0.3
    assert {"accuracy", "accuracy_by_budget", "iterations"} == set(result.figures)
    assert len(result.tables["examples"]) == 12


def test_a_word_problem_is_worked_out_from_its_verbs():
    problem = word_problem(random.Random(3), 3)
    events = problem.question.rstrip(".").split(",")
    total = int(events[0].split()[1])
    counts = []
    for event, op in zip(events[1:], problem.knowledge, strict=True):
        verb, amount = event.split()
        assert (verb in ADD_VERBS) == (op == "add") and (verb in SUB_VERBS) == (op == "sub")
        total = total + int(amount) if op == "add" else total - int(amount)
        assert 0 <= total <= 9
        counts.append(str(total))
    assert problem.answer == ",".join(counts)
    assert PROMPTS.extract(PROMPTS.solution_text(problem.rationale, problem.answer)) == problem.answer
    assert word_problems(5, 3, 0, "test") == word_problems(5, 3, 0, "test") != word_problems(5, 3, 0, "train")


def test_the_three_prompts_keep_lorids_structure():
    problem = word_problem(random.Random(0), 2)
    ir = PROMPTS.training_pair(INTUITIVE, problem.question, problem.rationale, problem.answer, problem.knowledge)
    kg = PROMPTS.training_pair(KNOWLEDGE, problem.question, problem.rationale, problem.answer, problem.knowledge)
    dr = PROMPTS.training_pair(DEEP, problem.question, problem.rationale, problem.answer, problem.knowledge)
    assert ir[0] == f"ir:{problem.question}>" and kg[1] == ",".join(problem.knowledge)
    assert dr[0] == f"dr:{problem.question}k:{kg[1]}>" and dr[1] == ir[1] == f"{problem.rationale}>{problem.answer}."


@pytest.mark.parametrize("values, field", [({"reasoning_steps": 0}, "reasoning_steps"),
                                           ({"top_p": 0.0}, "top_p"), ({"targets": "everything"}, "targets"),
                                           ({"max_iterations": 1.5}, "max_iterations")])
def test_bad_settings_are_refused(values, field):
    with pytest.raises(LabSettingsError, match=field):
        settings_from_dict(LoRIDSettings, values)


def test_the_panel_runs_through_the_app(studio_server):
    client, workspace = studio_server.session()
    tiny = LoRIDSettings(reasoning_steps=1, train_problems=16, pretrain_steps=4, reasoner_steps=3, knowledge_steps=3,
                         test_problems=4, max_iterations=2)
    outputs = run_panel(client, workspace, "lorid", tiny)
    assert record_of(outputs)["status"] == "done"
    assert len(figures_of(outputs)) == 3
    assert any("accuracy" in table["headers"] for table in tables_of(outputs))
