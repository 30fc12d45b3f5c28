"""The Library tab through its API: list, inspect, rename, delete, import a zip or a safetensors file."""

from __future__ import annotations

import zipfile

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError

from tests.conftest import EXAMPLES, path_of, train_through_app


def _names(client, workspace) -> list[str]:
    gallery = client.predict(workspace, None, api_name="/library")[0]
    return sorted(item["caption"].split(" · ")[0] for item in gallery)


@pytest.fixture(scope="module")
def own_package(studio_server):
    """A workspace of its own with one package (`rocket`), so renames and deletes touch nobody else."""
    client, workspace = studio_server.session()
    assert train_through_app(client, workspace, EXAMPLES / "rocket.jpg", name="rocket", sample_every=0)["status"] == "done"
    return client, workspace


def test_library_shows_thumbnail_method_base_token_and_date(own_package):
    client, workspace = own_package
    gallery = client.predict(workspace, None, api_name="/library")[0]
    assert len(gallery) == 1
    name, method, base, token = gallery[0]["caption"].split(" · ")
    assert (name, method, base) == ("rocket", "b-lora", "tiny-sdxl") and token.startswith("[v")
    facts, details, new_name = client.predict(workspace, "rocket", api_name="/inspect")
    assert "b-lora" in facts and "tiny-sdxl" in facts
    assert details["adapter"]["created"] and "samples/full.png" in details["files"]
    assert new_name == "rocket"


def test_rename_updates_folder_metadata_card_and_kohya_files(own_package, studio_server):
    client, workspace = own_package
    client.predict(workspace, "rocket", "launch", api_name="/rename")
    assert _names(client, workspace) == ["launch"]
    folder = studio_server.studio.workspace_of(workspace).packages / "launch"
    details = client.predict(workspace, "launch", api_name="/inspect")[1]
    assert details["adapter"]["name"] == "launch"
    assert "kohya/launch_content.safetensors" in details["files"]
    assert "# launch" in (folder / "README.md").read_text()
    with pytest.raises(AppError, match="not allowed"):
        client.predict(workspace, "launch", "../../elsewhere", api_name="/rename")
    client.predict(workspace, "launch", "rocket", api_name="/rename")


def test_export_then_import_the_zip_as_a_new_package(own_package):
    client, workspace = own_package
    download, _ = client.predict(workspace, "rocket", api_name="/export")
    client.predict(workspace, handle_file(path_of(download)), "rocket-copy", "tiny-sdxl", "", api_name="/import")
    assert _names(client, workspace) == ["rocket", "rocket-copy"]
    client.predict(workspace, "rocket-copy", api_name="/delete")
    assert _names(client, workspace) == ["rocket"]


def test_import_a_lora_safetensors_file(own_package, studio_server):
    client, workspace = own_package
    weights = studio_server.studio.workspace_of(workspace).packages / "rocket" / "pytorch_lora_weights.safetensors"
    client.predict(workspace, handle_file(str(weights)), "imported", "tiny-sdxl", "[v7]", api_name="/import")
    details = client.predict(workspace, "imported", api_name="/inspect")[1]
    assert details["adapter"]["token"] == "[v7]"
    assert details["adapter"]["imported_from"] == "pytorch_lora_weights.safetensors"
    client.predict(workspace, "imported", api_name="/delete")


@pytest.mark.parametrize(("entries", "message"), [
    ({"../evil/adapter.json": b"{}"}, "unsafe path"),
    ({"pkg/adapter.json": b"{}", "pkg/weights.ckpt": b"x"}, "pickled checkpoint"),
    ({"notes.txt": b"hello"}, "no adapter.json"),
])
def test_unsafe_or_broken_zips_are_refused(own_package, tmp_path, entries, message):
    client, workspace = own_package
    upload = tmp_path / "upload.zip"
    with zipfile.ZipFile(upload, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    with pytest.raises(AppError, match=message):
        client.predict(workspace, handle_file(str(upload)), "", "tiny-sdxl", "", api_name="/import")
    assert _names(client, workspace) == ["rocket"]


def test_a_pickle_is_refused_before_it_is_opened(own_package, tmp_path):
    client, workspace = own_package
    upload = tmp_path / "lora.pt"
    upload.write_bytes(b"\x80\x04not really")
    with pytest.raises(AppError):
        client.predict(workspace, handle_file(str(upload)), "", "tiny-sdxl", "", api_name="/import")
    assert _names(client, workspace) == ["rocket"]
