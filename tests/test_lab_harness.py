"""The lab harness on its own: settings checked against their metadata, progress and cancel, results on disk,
the experiment registry and the plot helpers."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pytest
import torch

from pipelines.lab import (
    EXPERIMENTS,
    Experiment,
    LabCancelled,
    LabError,
    LabResult,
    LabSettings,
    LabSettingsError,
    Progress,
    make_settings,
    register_experiment,
    run_experiment,
    settings_from_dict,
)
from pipelines.lab.plots import bar_plot, heatmap, line_plot
from pipelines.training import CancelToken, TrainingCancelled
from tests import lab_fakes


@dataclass
class DemoSettings(LabSettings):
    rank: int = field(default=4, metadata={"help": "rank", "min": 1, "max": 64})
    rate: float = field(default=0.1, metadata={"help": "rate", "min": 0.0, "max": 1.0})
    merge: bool = field(default=True, metadata={"help": "merge"})
    task: str = field(default="copy", metadata={"help": "task", "choices": ["copy", "sort"]})
    ranks: tuple[int, ...] = field(default=(1, 2), metadata={"help": "ranks", "min": 1, "max": 8})
    scales: tuple[float, ...] = field(default=(0.5,), metadata={"help": "scales", "min": 0.0})


def test_defaults_validate_and_convert_to_plain_json():
    settings = DemoSettings()
    assert settings.to_dict() == {"seed": 0, "model_id": "", "rank": 4, "rate": 0.1, "merge": True, "task": "copy",
                                  "ranks": [1, 2], "scales": [0.5]}
    assert json.loads(json.dumps(settings.to_dict())) == settings.to_dict()


@pytest.mark.parametrize(("values", "message"), [
    ({"rate": float("nan")}, "rate must be a finite number"),
    ({"rate": float("inf")}, "rate must be a finite number"),
    ({"rate": "nan"}, "rate must be a finite number"),
    ({"rank": True}, "rank must be a whole number, not True"),
    ({"rate": False}, "rate must be a number, not False"),
    ({"rank": 0}, "rank must be between 1 and 64, not 0"),
    ({"rank": "65"}, "rank must be between 1 and 64, not 65"),
    ({"rank": 2.5}, "rank must be a whole number, not 2.5"),
    ({"rank": "four"}, "rank must be a whole number, not 'four'"),
    ({"rank": None}, "rank needs a value"),
    ({"rate": 1.5}, "rate must be between 0 and 1, not 1.5"),
    ({"merge": "maybe"}, "merge must be true or false"),
    ({"merge": 1}, "merge must be true or false"),
    ({"task": "reverse"}, "task must be one of copy, sort, not 'reverse'"),
    ({"ranks": "1, 9"}, "each value of ranks must be between 1 and 8, not 9"),
    ({"ranks": ""}, "ranks must hold between 1 and 32 values, not 0"),
    ({"ranks": [1, True]}, "each value of ranks must be a whole number, not True"),
    ({"ranks": ",".join(["1"] * 100_000)}, "ranks must hold between 1 and 32 values, not 100000"),
    ({"rank": "9" * 5000}, "rank must be a whole number, not '" + "9" * 36 + "..."),
    ({"scales": [0.5, float("inf")]}, "each value of scales must be a finite number"),
    ({"seed": -1}, "seed must be between 0 and 2147483647, not -1"),
    ({"model_id": "../../etc/passwd"}, "model_id '../../etc/passwd' is not a Hub id"),
    ({"model_id": "a/b\nc"}, "model_id must be one line"),
    ({"unknown": 1}, "unknown setting 'unknown' (known: seed, model_id, rank, rate, merge, task, ranks, scales)"),
])
def test_bad_settings_are_refused_with_one_line_naming_the_field(values, message):
    with pytest.raises(LabSettingsError) as error:
        settings_from_dict(DemoSettings, values)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_ui_and_cli_values_are_coerced_to_the_field_types():
    settings = settings_from_dict(DemoSettings, {
        "rank": "8", "rate": 1, "merge": "false", "task": "sort", "ranks": "[1, 4, 8]", "scales": "0.25,1e-1",
        "seed": 7.0, "model_id": "owner/model-1"})
    assert (settings.rank, settings.rate, settings.merge, settings.task) == (8, 1.0, False, "sort")
    assert settings.ranks == (1, 4, 8) and settings.scales == (0.25, 0.1)
    assert settings.seed == 7 and isinstance(settings.seed, int) and isinstance(settings.rate, float)
    assert settings_from_dict(DemoSettings, {"ranks": [2, 4.0]}).ranks == (2, 4)


def test_settings_are_checked_when_made_directly_and_subclasses_extend_validate():
    with pytest.raises(LabSettingsError, match="rank must be between 1 and 64"):
        DemoSettings(rank=100)

    @dataclass
    class Ordered(DemoSettings):
        def validate(self) -> None:
            super().validate()
            if self.ranks != tuple(sorted(self.ranks)):
                raise LabSettingsError("ranks must be in increasing order")

    with pytest.raises(LabSettingsError, match="increasing order"):
        settings_from_dict(Ordered, {"ranks": "4, 2"})


def test_a_field_type_no_form_can_show_is_refused_at_registration():
    @dataclass
    class Unshowable(LabSettings):
        table: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match="lab settings may be int, float, bool, str or tuple"):
        register_experiment(Experiment("lora", Unshowable, lambda s, p: None, "x"))


def test_progress_reports_and_stops_at_the_next_update_once_cancelled():
    seen, token = [], CancelToken()
    progress = Progress(lambda fraction, message: seen.append((fraction, message)), token, interval=0.0)
    progress.update(0.25, "a quarter")
    part = progress.span(0.5, 1.0)
    part.update(0.5, "half of the second half")
    assert seen == [(0.25, "a quarter"), (0.75, "half of the second half")]
    token.cancel()
    with pytest.raises(LabCancelled) as stopped:
        part.update(0.6)
    assert isinstance(stopped.value, TrainingCancelled)
    assert progress.fraction == 0.8


def test_progress_throttles_reports_but_never_drops_the_last_or_a_new_phase():
    seen = []
    progress = Progress(lambda fraction, message: seen.append((fraction, message)), interval=3600)
    progress.update(0.0, "starting")
    progress.update(0.0, "loading")  # a new phase at the same point is reported
    for i in range(1, 100):
        progress.update(i / 100, f"step {i}")  # within the interval: not reported
    progress.update(2.0, "done")  # clamped to 1, and the last report always goes through
    progress.update(float("nan"))
    assert seen == [(0.0, "starting"), (0.0, "loading"), (1.0, "done")]


def _result() -> LabResult:
    xs = [1, 2, 4]
    return LabResult(
        method="lora", summary="**three** points", metrics={"best": torch.tensor(0.75), "rank": 4},
        tables={"sweep": [{"rank": r, "accuracy": r / 4, "note": "ok", "nothing": None} for r in xs]},
        figures={"accuracy": line_plot({"LoRA": (xs, [0.2, 0.5, 0.75])}, title="t", xlabel="x", ylabel="y")},
        settings={"ranks": (1, 2, 4), "seed": 0},
    )


def test_a_result_saves_and_loads_back(tmp_path):
    result = _result()
    folder = result.save(tmp_path / "out")
    assert sorted(p.name for p in folder.iterdir()) == ["accuracy.png", "result.json"]
    assert (folder / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = LabResult.load(folder)
    assert loaded.method == "lora" and loaded.summary == "**three** points"
    assert loaded.metrics == {"best": 0.75, "rank": 4.0}
    assert loaded.tables == {"sweep": [{"rank": r, "accuracy": r / 4, "note": "ok", "nothing": None}
                                       for r in (1, 2, 4)]}
    assert loaded.settings == {"ranks": [1, 2, 4], "seed": 0}
    assert loaded.figure_paths == {"accuracy": folder / "accuracy.png"}
    paths_only = LabResult.load(folder, figures=False)
    assert paths_only.figures == {} and paths_only.figure_paths == loaded.figure_paths
    # The loaded figure shows the saved picture at its own size: saving it again gives the same pixels.
    from matplotlib.image import imread

    again = loaded.save(tmp_path / "again")
    assert (imread(again / "accuracy.png") == imread(folder / "accuracy.png")).all()


def test_a_result_with_a_bad_name_or_number_writes_nothing(tmp_path):
    result = _result()
    result.figures["../escape"] = result.figures.pop("accuracy")
    with pytest.raises(ValueError, match="figure name"):
        result.save(tmp_path / "out")
    result = _result()
    result.metrics["broken"] = math.nan
    with pytest.raises(ValueError, match="metric 'broken' is nan"):
        result.save(tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_a_forged_or_incomplete_result_folder_is_refused(tmp_path):
    folder = _result().save(tmp_path / "out")
    data = json.loads((folder / "result.json").read_text())
    (folder / "accuracy.png").unlink()
    with pytest.raises(LabError, match="lacks the figure accuracy.png"):
        LabResult.load(folder)
    (folder / "result.json").write_text(json.dumps({**data, "figures": ["../../secret"]}))
    with pytest.raises(LabError, match="invalid names"):
        LabResult.load(folder)
    (folder / "result.json").write_text(json.dumps({**data, "format": "something-else"}))
    with pytest.raises(LabError, match="not a Block Studio lab result"):
        LabResult.load(folder)
    with pytest.raises(LabError, match="holds no result.json"):
        LabResult.load(tmp_path)


def test_the_registry_holds_the_lora_experiment_and_refuses_strangers():
    assert EXPERIMENTS["lora"].settings_cls.quick() != EXPERIMENTS["lora"].settings_cls()
    with pytest.raises(ValueError, match="no adapter method of that name"):
        register_experiment(Experiment("no-such-method", DemoSettings, lambda s, p: None, "x"))
    with pytest.raises(ValueError, match="registered already"):
        register_experiment(Experiment("lora", DemoSettings, lambda s, p: None, "x"))
    with pytest.raises(LabError, match="no lab experiment for 'nope'"):
        run_experiment("nope")


def test_every_experiment_module_imports_and_every_quick_setting_is_valid():
    from pipelines.lab import BROKEN

    assert BROKEN == {}
    for method, experiment in EXPERIMENTS.items():
        quick = experiment.settings_cls.quick()
        assert isinstance(quick, experiment.settings_cls), method
        assert experiment.description.strip(), method
        assert settings_from_dict(experiment.settings_cls, quick.to_dict()) == quick


def test_run_experiment_checks_settings_and_fills_them_into_the_result(monkeypatch):
    fake = lab_fakes.install(monkeypatch)
    result = run_experiment("lora", {"steps": "3"})
    assert result.settings["steps"] == 3 and result.metrics == {"steps": 3} and fake.runs == 1
    with pytest.raises(LabSettingsError, match="steps must be between 1 and 100"):
        run_experiment("lora", {"steps": 0})
    with pytest.raises(LabSettingsError, match="lora takes GateSettings, not DemoSettings"):
        make_settings("lora", DemoSettings())
    assert fake.runs == 1


def test_plots_have_titles_and_axis_labels():
    figures = [
        line_plot({"a": [1.0, 2.0], "b": ([1, 4], [3.0, 1.0])}, title="Lines", xlabel="rank", ylabel="accuracy",
                  logx=True, hlines={"baseline": 1.5}),
        bar_plot(["x", "y"], {"first": [1, 2], "second": [3, 4]}, title="Bars", xlabel="name", ylabel="count"),
        heatmap([[0.0, 1.0], [2.0, 3.0]], title="Heat", xlabel="column", ylabel="row", row_labels=["r0", "r1"],
                col_labels=["c0", "c1"], colorbar_label="value"),
    ]
    for figure, title, labels in zip(figures, ["Lines", "Bars", "Heat"],
                                     [("rank", "accuracy"), ("name", "count"), ("column", "row")], strict=True):
        axes = figure.axes[0]
        assert axes.get_title() == title and (axes.get_xlabel(), axes.get_ylabel()) == labels
    assert [line.get_label() for line in figures[0].axes[0].lines] == ["a", "b", "baseline"]
    with pytest.raises(ValueError, match="series 'first' has 1 values for 2 labels"):
        bar_plot(["x", "y"], {"first": [1]}, title="t", xlabel="x", ylabel="y")
