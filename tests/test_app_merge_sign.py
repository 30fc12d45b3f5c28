"""Merging styles (Mix tab) and signing packages (Share tab) through the app's API."""

from __future__ import annotations

import json
import shutil

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError

from tests.conftest import path_of


@pytest.fixture(scope="module")
def own_copies(trained, studio_server):
    """A workspace of its own holding copies of the trained `cat` and `coffee` packages."""
    client, source = trained
    library = studio_server.studio.library
    _, workspace = studio_server.session()
    for name in ("cat", "coffee"):
        shutil.copytree(library(source).path(name), library(workspace).workspace.packages / name)
    return client, workspace


def test_two_styles_merge_into_a_new_package_of_the_library(own_copies, studio_server):
    client, workspace = own_copies
    message = client.predict(workspace, "cat", "coffee", None, "masked", "0.6", "", "", "blend", api_name="/merge")
    assert "**blend**" in message and "masked" in message
    package = studio_server.studio.library(workspace).open("blend")
    assert [s["name"] for s in package.info["merge"]["sources"]] == ["cat", "coffee"]
    assert package.part_for("style") == "style"
    summed = client.predict(workspace, "cat", "coffee", None, "sum", "", "1, 0.5", "", "", api_name="/merge")
    assert "**merged-style**" in summed
    assert studio_server.studio.library(workspace).open("merged-style").info["merge"]["weights"] == [1.0, 0.5]


def test_merging_styles_of_different_base_models_is_one_line(own_copies, studio_server):
    client, workspace = own_copies
    info_path = studio_server.studio.library(workspace).path("coffee") / "adapter.json"
    original = info_path.read_text()
    info_path.write_text(json.dumps({**json.loads(original), "base_model": "sdxl"}))
    try:
        with pytest.raises(AppError, match="different base models"):
            client.predict(workspace, "cat", "coffee", None, "masked", "0.6", "", "", "nope", api_name="/merge")
        with pytest.raises(AppError, match="at least two"):
            client.predict(workspace, "cat", None, None, "masked", "0.6", "", "", "nope", api_name="/merge")
    finally:
        info_path.write_text(original)
    assert not (studio_server.studio.library(workspace).workspace.packages / "nope").exists()


def test_a_signed_copy_verifies_survives_export_and_an_unsigned_package_says_so(own_copies, studio_server):
    client, workspace = own_copies
    message = client.predict(workspace, "cat", "10110", "my key", "", api_name="/sign")
    assert "**cat-signed**" in message
    verified = client.predict(workspace, "cat-signed", "my key", api_name="/verify")
    assert "`10110`" in verified
    with pytest.raises(AppError, match="cat carries no MarkBoard signature"):
        client.predict(workspace, "cat", "", api_name="/verify")
    with pytest.raises(AppError, match="65 bits"):
        client.predict(workspace, "cat", "1" * 65, "", "", api_name="/sign")
    # Exported as a zip and imported elsewhere, the package still carries the signature.
    download, _ = client.predict(workspace, "cat-signed", api_name="/export")
    _, elsewhere = studio_server.session()
    client.predict(elsewhere, handle_file(path_of(download)), "imported", "tiny-sdxl", "", api_name="/import")
    assert "`10110`" in client.predict(elsewhere, "imported", "my key", api_name="/verify")
    # Signing the signed copy swaps its branches.
    client.predict(workspace, "cat-signed", "01", "my key", "cat-swapped", api_name="/sign")
    assert "`01`" in client.predict(workspace, "cat-swapped", "my key", api_name="/verify")
