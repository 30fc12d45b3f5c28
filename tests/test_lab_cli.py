"""`blockstudio lab`: list the methods, run an experiment and write its result folder; bad input exits with 2."""

from __future__ import annotations

import json

import pytest

from pipelines.adapters import METHODS
from studio.cli import EXIT_BAD_INPUT, main
from tests import lab_fakes


def test_lab_list_names_every_method_and_whether_it_runs(capsys):
    assert main(["lab", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted(METHODS)
    assert any(line.startswith("lora ") and line.endswith("runnable") for line in lines)


def test_lab_run_writes_the_result_folder_and_prints_the_summary(monkeypatch, tmp_path, capsys):
    fake = lab_fakes.install(monkeypatch)
    out = tmp_path / "results" / "lora"
    assert main(["lab", "run", "lora", "--quick", "--set", "steps=3", "--set", "seed=7", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "ran 3 steps" in printed.out and str(out) in printed.out
    assert "100%" in printed.err
    data = json.loads((out / "result.json").read_text())
    assert data["settings"]["steps"] == 3 and data["settings"]["seed"] == 7
    assert (out / "squares.png").is_file() and fake.runs == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "steps=0"], "steps must be between 1 and 100, not 0"),
    (["--set", "steps=nan"], "steps must be a whole number, not nan"),
    (["--set", "fail=maybe"], "fail must be true or false"),
    (["--set", "speed=3"], "unknown setting 'speed'"),
    (["--set", "steps"], "--set takes key=value"),
    (["--set", "steps=2", "--set", "steps=3"], "--set steps is given twice"),
])
def test_bad_settings_exit_with_2_and_one_line_before_running(monkeypatch, tmp_path, capsys, args, message):
    fake = lab_fakes.install(monkeypatch)
    assert main(["lab", "run", "lora", "--out", str(tmp_path / "out"), *args]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert fake.runs == 0 and not (tmp_path / "out").exists()


def test_an_unknown_method_or_an_unwritable_folder_exits_with_2(monkeypatch, tmp_path, capsys):
    fake = lab_fakes.install(monkeypatch)
    assert main(["lab", "run", "nope"]) == EXIT_BAD_INPUT
    assert "no lab experiment for 'nope'" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["lab", "run", "lora", "--out", str(blocker)]) == EXIT_BAD_INPUT
    assert "exists and is not a folder" in capsys.readouterr().err and fake.runs == 0
