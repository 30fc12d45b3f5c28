"""Mix and Re-embed through the API: before/after, swapping packages on a warm base, grids, new prompts."""

from __future__ import annotations

import numpy as np
import pytest
from gradio_client.exceptions import AppError
from PIL import Image

from tests.conftest import path_of

SETTINGS = [0, 2, None, None, None, ""]  # seed, steps, guidance, width, height, negative prompt


def _pixels(item) -> np.ndarray:
    return np.asarray(Image.open(path_of(item)).convert("RGB"), dtype=np.int16)


def test_before_after_uses_the_base_model_and_swaps_keep_it_loaded(trained, studio_server):
    client, workspace = trained
    slider, used, results, _ = client.predict(workspace, "cat", 1.0, "coffee", 1.0, "A [c] in [s] style", True,
                                              *SETTINGS, api_name="/mix")
    before, after = (_pixels(p) for p in slider)
    assert np.abs(before - after).max() > 0
    assert "[c]" not in used and "[v" in used
    generation = studio_server.studio.generation
    (studio,) = generation.loaded().values()
    # "before" is the base model: the same pipeline with the adapters switched off gives the same pixels.
    base = studio.generate(used.split("`")[1], seed=0, steps=2)[0]
    assert np.abs(before - np.asarray(base, dtype=np.int16)).max() <= 1

    client.predict(workspace, "coffee", 0.8, "cat", 1.2, "A [c] in [s] style", False, *SETTINGS, api_name="/mix")
    again = client.predict(workspace, "cat", 1.0, "coffee", 1.0, "A [c] in [s] style", False, *SETTINGS,
                           api_name="/mix")
    assert studio.base_loads == 1 and studio.adapter_loads >= 4
    # Back to the first pair: the same image, up to float rounding (hotswap pads ranks, which reorders sums).
    assert np.abs(_pixels(again[0][1]) - after).max() <= 1
    assert len(again[2]) >= 3  # every result is kept in the workspace's gallery


def test_grid_sweeps_content_and_style_scales(trained):
    client, workspace = trained
    grid, results = client.predict(workspace, "cat", "coffee", "A [c] in [s] style", "0.5, 1.5", "0, 1, 2",
                                   *SETTINGS, api_name="/grid")
    image = Image.open(path_of(grid))
    assert image.width > image.height  # 3 style columns, 2 content rows
    with pytest.raises(AppError, match="scales must be numbers"):
        client.predict(workspace, "cat", "coffee", "A [c]", "half", "1", *SETTINGS, api_name="/grid")


def test_reembed_puts_the_subject_in_templates_and_free_prompts(trained):
    client, workspace = trained
    gallery = client.predict(workspace, "cat", 1.0, ["A [c] on the beach", "A [c] made of gold"],
                             "A [c] riding a bicycle\n\n", *SETTINGS, api_name="/reembed")
    assert [item["caption"] for item in gallery] == ["A [c] on the beach", "A [c] made of gold",
                                                     "A [c] riding a bicycle"]
    styled = client.predict(workspace, "coffee", 1.0, [], "A lighthouse in [s] style", *SETTINGS,
                            api_name="/restyle")
    assert len(styled) == 1


def test_mixing_adapters_of_different_base_models_is_refused(trained, studio_server):
    client, workspace = trained
    package = studio_server.studio.library(workspace).open("coffee")
    original = dict(package.info)
    info_path = package.path / "adapter.json"
    import json

    info_path.write_text(json.dumps({**original, "base_model": "sdxl"}))
    try:
        with pytest.raises(AppError, match="different base models"):
            client.predict(workspace, "cat", 1.0, "coffee", 1.0, "A [c] in [s] style", False, *SETTINGS,
                           api_name="/mix")
    finally:
        info_path.write_text(json.dumps(original))


@pytest.fixture(scope="module")
def flux_session(studio_server):
    """A workspace of its own with one SplitFlux package, `cat-flux`, trained through the app."""
    from tests.conftest import EXAMPLES, train_through_app

    client, workspace = studio_server.session()
    record = train_through_app(client, workspace, EXAMPLES / "cat.jpg", name="cat-flux", steps=2, sample_every=0,
                               method="splitflux", model="tiny-flux")
    assert record["status"] == "done", record["error"]
    return client, workspace


def _newest_parameters(studio_server, workspace) -> dict:
    import json

    newest = max(studio_server.studio.workspace_of(workspace).outputs.glob("*.png"))
    with Image.open(newest) as image:
        return json.loads(image.text["parameters"])


def test_splitflux_packages_train_mix_and_reembed_with_their_own_parts(flux_session, studio_server):
    client, workspace = flux_session
    details = client.predict(workspace, "cat-flux", api_name="/inspect")[1]
    assert details["adapter"]["method"] == "splitflux" and "content_reembed.safetensors" in details["files"]
    _, used, _, _ = client.predict(workspace, "cat-flux", 1.0, "cat-flux", 1.0, "A [c] object in [s] style",
                                   False, *SETTINGS, api_name="/mix")
    info = details["adapter"]
    assert f"A {info['token']} object in {info['style_token']} style" in used  # [s]: the package's style token
    gallery = client.predict(workspace, "cat-flux", 1.0, ["A [c] made of gold"], "", *SETTINGS,
                             api_name="/reembed")
    assert len(gallery) == 1
    newest = max(studio_server.studio.workspace_of(workspace).outputs.glob("*.png"))
    with Image.open(newest) as image:
        assert '"content": "cat-flux:content_reembed@1"' in image.text["parameters"]


def test_mix_uses_the_papers_content_part_and_other_parts_on_request(flux_session, studio_server):
    client, workspace = flux_session
    facts = client.predict(workspace, "cat-flux", api_name="/inspect")[0]
    assert "Composition: paper composition: mix loads content_reembed" in facts and "boundary off" in facts
    client.predict(workspace, "cat-flux", 1.0, "cat-flux", 1.0, "A [c] object in [s] style", False, *SETTINGS,
                   api_name="/mix")
    assert _newest_parameters(studio_server, workspace)["content"] == "cat-flux:content_reembed@1"
    client.predict(workspace, "cat-flux", 0.5, "cat-flux", 1.0, "A [c] object in [s] style", False, *SETTINGS,
                   False, "content", True, api_name="/mix")
    assert _newest_parameters(studio_server, workspace)["content"] == "cat-flux:content+boundary@0.5"


def test_package_in_the_old_layout_mixes_in_the_app_and_the_library_says_how_it_was_made(flux_session, studio_server):
    from tests.legacy_packages import old_splitflux_layout

    client, workspace = flux_session
    packages = studio_server.studio.workspace_of(workspace).packages
    old_splitflux_layout(packages / "cat-flux", packages / "cat-flux-old")
    facts = client.predict(workspace, "cat-flux-old", api_name="/inspect")[0]
    assert "Composition: older package" in facts and "plus the boundary blocks" in facts
    client.predict(workspace, "cat-flux-old", 1.0, "cat-flux", 1.0, "A [c] object in [s] style", False, *SETTINGS,
                   api_name="/mix")
    assert _newest_parameters(studio_server, workspace)["content"] == "cat-flux-old:content@1"
    with pytest.raises(AppError, match="no 'boundary' part"):
        client.predict(workspace, "cat-flux-old", 1.0, "cat-flux", 1.0, "A [c] object in [s] style", False,
                       *SETTINGS, False, "default", True, api_name="/mix")
