"""A third training recipe, registered from one module (`tests/toy_recipe.py`), reaches the whole studio: the
CLI, the Train tab, the library, mix, export, import and the model card, with no other file changed."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from tests.conftest import EXAMPLES, launch_studio, path_of, stop_studio, train_through_app


@pytest.fixture(scope="module")
def toy():
    """The toy recipe, registered for this module's tests and taken out again after them."""
    from pipelines.recipes import register_recipe, unregister_recipe
    from tests import toy_recipe

    register_recipe(toy_recipe.SPEC)  # importing registers it; after an earlier unregister, this does
    yield toy_recipe
    unregister_recipe(toy_recipe.KEY)


@pytest.fixture(scope="module")
def toy_package(toy, tmp_path_factory):
    """A DyLoRA toy package trained through `blockstudio train toy`, with the toy's own form setting."""
    from studio.cli import main

    out = tmp_path_factory.mktemp("toy") / "cat"
    code = main(["train", "toy", "--image", str(EXAMPLES / "cat.jpg"), "--out", str(out), "--model", "tiny-sdxl",
                 "--steps", "3", "--rank", "4", "--adapter", "dylora", "--template", "a photo of {token}",
                 "--sample-steps", "1", "--checkpoint-every", "3"])
    assert code == 0
    return out


def _info(package) -> dict:
    return json.loads((package / "adapter.json").read_text())


def test_the_cli_offers_the_recipe_with_its_own_options(toy, capsys):
    from studio.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "toy", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--template" in help_text and "a photo of {token}" in help_text and "dylora" in help_text
    assert "e.g. [t42]" in " ".join(help_text.split())  # the token help names the toy's own kind of token
    # Its choices are checked by the option the metadata made, and its validate() by the CLI's one-line error.
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "toy", "--image", str(EXAMPLES / "cat.jpg"), "--out", "x", "--template", "{token}!"])
    assert exit_info.value.code == 2
    assert main(["train", "toy", "--image", str(EXAMPLES / "cat.jpg"), "--out", "x", "--rank", "64"]) == 2
    assert "the toy recipe trains ranks up to 32" in capsys.readouterr().err


def test_a_package_trained_from_the_cli_records_the_recipe_and_its_card_notes(toy_package, toy):
    info = _info(toy_package)
    assert info["method"] == toy.KEY and info["format_version"] == 2
    assert info["prompt"].startswith("a photo of [t")  # the toy's token format and its form setting
    assert set(info["parts"]) == {"subject", "look"}
    assert info["parts"]["look"]["blocks"] == toy.BLOCKS["look"]
    assert info["composition"]["uses"]["style"] == "look"
    card = (toy_package / "README.md").read_text()
    assert toy.CARD_NOTE in card and "| template | `a photo of {token}` |" in card
    assert "kohya/cat_look.safetensors" in card and "kohya/cat_style.safetensors" not in card
    assert (toy_package / "kohya" / "cat_look.safetensors").is_file()


def test_export_writes_the_package_again_at_another_rank(toy_package, tmp_path):
    from pipelines.package import AdapterPackage
    from studio.cli import main

    assert main(["export", str(toy_package), "--rank", "2", "--out", str(tmp_path / "small")]) == 0
    small = AdapterPackage.open(tmp_path / "small")
    assert small.method == "toy-lora"
    assert {part: small.meta.parts[part].rank for part in ("subject", "look")} == {"subject": 2, "look": 2}
    assert "Toy LoRA notes" in (tmp_path / "small" / "README.md").read_text()


def test_import_reads_the_recipes_files_and_refuses_others(toy_package, cat_package, tmp_path, capsys):
    from pipelines.package import AdapterPackage
    from studio.cli import main

    assert main(["import", str(toy_package / "pytorch_lora_weights.safetensors"), "--method", "toy-lora",
                 "--out", str(tmp_path / "imported")]) == 0
    imported = AdapterPackage.open(tmp_path / "imported")
    assert imported.method == "toy-lora" and imported.meta.base_model == "tiny-sdxl"  # the recipe's own default
    assert set(imported.parts()) >= {"subject", "look"}
    assert imported.meta.token == _info(toy_package)["token"]  # read from the file's metadata
    assert imported.part_for("style") == "look"
    # A B-LoRA file is no toy LoRA: one line, nothing written.
    assert main(["import", str(cat_package / "pytorch_lora_weights.safetensors"), "--method", "toy-lora",
                 "--out", str(tmp_path / "refused")]) == 2
    assert "not a toy LoRA" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


@pytest.fixture(scope="module")
def toy_studio(toy):
    server = launch_studio(gpu=False)
    yield server
    stop_studio(server)


def _component(demo, kind: str, **attributes):
    import gradio as gr

    cls = getattr(gr, kind)
    return next(c for c in demo.blocks.values()
                if isinstance(c, cls) and all(getattr(c, k, None) == v for k, v in attributes.items()))


def test_the_app_trains_lists_mixes_and_imports_the_recipe(toy_studio, toy_package, toy):
    demo = toy_studio.demo
    method = _component(demo, "Radio", label="Method")
    assert ("Toy LoRA · SDXL", toy.KEY) in method.choices
    settings = _component(demo, "Accordion", elem_id="train-settings-toy")
    assert settings.label == "Toy LoRA settings"
    template = _component(demo, "Dropdown", elem_id="train-setting-template")
    assert template.label == "Prompt template" and template.value == toy.TEMPLATES[0]
    importer = _component(demo, "Dropdown", elem_id="library-import-method")
    assert ("Toy LoRA · SDXL", toy.KEY) in importer.choices

    client, workspace = toy_studio.session()
    record = train_through_app(client, workspace, EXAMPLES / "cat.jpg", name="toycat", sample_every=0,
                               method=toy.KEY, model="tiny-sdxl")
    assert record["status"] == "done", record
    gallery = client.predict(workspace, None, api_name="/library")[0]
    assert [item["caption"].split(" · ")[:3] for item in gallery] == [["toycat", toy.KEY, "tiny-sdxl"]]
    facts = client.predict(workspace, "toycat", api_name="/inspect")[0]
    assert "Toy LoRA · SDXL" in facts and "subject" in facts and "look" in facts

    library = toy_studio.studio.library(workspace)
    assert library.open("toycat").meta.prompt.startswith("a [t")  # the form setting's default

    # The form's own settings reach the recipe, checked by its metadata.
    jobs, owner = toy_studio.studio.jobs, toy_studio.studio.workspace_of(workspace).id
    job = dict(image=EXAMPLES / "cat.jpg", method=toy.KEY, model="tiny-sdxl", steps=2, rank=4, learning_rate=1e-3)
    with pytest.raises(Exception, match="prompt template must be one of"):
        jobs.submit(owner, name="refused", options={"template": "{token}!"}, **job)
    record = jobs.submit(owner, name="toyphoto", options={"template": "a photo of {token}"}, **job)
    deadline = time.monotonic() + 300
    while jobs.get(owner, record.id).status in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert jobs.get(owner, record.id).status == "done"
    assert library.open("toyphoto").meta.prompt.startswith("a photo of [t")

    # Mix: the toy's subject part with its own look part, as its composition says.
    slider, used, _, _ = client.predict(workspace, "toycat", 1.0, "toycat", 1.0, "A [c] in [s] style", True,
                                        0, 2, None, None, None, "", api_name="/mix")
    before, after = (np.asarray(Image.open(path_of(p)).convert("RGB"), dtype=np.int16) for p in slider)
    assert np.abs(before - after).max() > 0 and "[t" in used
    (studio,) = toy_studio.studio.generation.loaded().values()
    assert studio.adapter_loads >= 2
    gallery = client.predict(workspace, "toycat", 1.0, [], "A [c] on the beach", 0, 2, None, None, None, "",
                             api_name="/reembed")
    assert [item["caption"] for item in gallery] == ["A [c] on the beach"]
    styled = client.predict(workspace, "toycat", 1.0, [], "A lighthouse in [s] style", 0, 2, None, None, None, "",
                            api_name="/restyle")
    assert len(styled) == 1

    # The library's import of a recipe's LoRA file.
    name = library.import_file(toy_package / "pytorch_lora_weights.safetensors", name="toyfile",
                               method=toy.KEY, model="tiny-sdxl")
    assert library.open(name).method == toy.KEY


def test_a_queued_job_whose_recipe_is_gone_fails_in_one_line_and_the_next_job_runs(toy, tmp_path):
    """A job queued for a recipe the server no longer has (a plugin removed before a restart) fails naming the
    method, without a traceback's KeyError, and the worker goes on with the queue."""
    from pipelines.recipes import register_recipe, unregister_recipe
    from studio.jobs import JobManager
    from studio.workspace import new_workspace_id

    ran = []

    def runner(method, request, **_):
        ran.append(method.key)

    queued = JobManager(tmp_path, start=False)
    owner = new_workspace_id(tmp_path)
    settings = dict(model="tiny-sdxl", steps=2, rank=4, learning_rate=1e-4)
    lost = queued.submit(owner, image=EXAMPLES / "cat.jpg", method=toy.KEY, name="lost", **settings)
    kept = queued.submit(owner, image=EXAMPLES / "cat.jpg", method="b-lora", name="kept", **settings)
    unregister_recipe(toy.KEY)
    jobs = JobManager(tmp_path, runner=runner)
    try:
        failed = jobs.wait(owner, lost.id)
        assert failed.status == "failed"
        assert f"unknown method {toy.KEY!r}" in failed.error and "KeyError" not in failed.error
        assert "\n" not in failed.error
        assert jobs.wait(owner, kept.id).status == "done" and ran == ["b-lora"]
    finally:
        jobs.close()
        register_recipe(toy.SPEC)


def test_a_ray_worker_process_finds_a_recipe_outside_the_built_ins_by_its_module(toy, tmp_path):
    """A worker process starts with the built-in recipes only; the job names the module that registers its recipe,
    which the worker imports before training."""
    import sys
    import threading

    from pipelines.recipes import RECIPES, register_recipe, unregister_recipe
    from studio.ray_worker import _RemoteJob
    from studio.workers import InProcessWorker

    class Pipe:
        def unload_lora_weights(self):
            pass

    trained = []
    done = threading.Event()

    def runner(method, request, **_):
        trained.append(method.key)
        done.set()

    unregister_recipe(toy.KEY)
    module = sys.modules.pop(toy.__name__)  # a fresh worker process has not imported it
    try:
        assert toy.KEY not in RECIPES
        assignment = {"kind": "training", "method": toy.KEY, "model": "tiny-sdxl", "recipe_module": toy.__name__,
                      "values": {"out": str(tmp_path / "pkg"), "image": "x.png"}}
        job = _RemoteJob("j1", assignment, (EXAMPLES / "cat.jpg").read_bytes())
        job.start(InProcessWorker(runner, load=lambda model: Pipe()))
        assert done.wait(60) and trained == [toy.KEY]
        assert toy.KEY in RECIPES
    finally:
        sys.modules[toy.__name__] = module
        unregister_recipe(toy.KEY)  # the worker's import registered the module's second copy
        register_recipe(toy.SPEC)
