"""Through the app's client: a B-LoRA trained with a DyLoRA adapter, downloaded from Share at a chosen rank."""

from __future__ import annotations

import json
import time
import zipfile

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError

from tests.conftest import EXAMPLES, job_record, path_of


def _train(client, workspace: str, name: str, adapter: str) -> dict:
    picker = client.predict(workspace, handle_file(str(EXAMPLES / "cat.jpg")), "b-lora", "tiny-sdxl", name, 3, 4,
                            1e-3, 0, 0, "", adapter, api_name="/train")[0]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        record = job_record(client, workspace, picker["value"])
        if record["status"] not in ("queued", "running", "cancelling"):
            return record
        time.sleep(0.1)
    raise TimeoutError("the job did not finish")


def _zip_info(download) -> tuple[set[str], dict]:
    with zipfile.ZipFile(path_of(download)) as archive:
        names = set(archive.namelist())
        top = sorted(names)[0].split("/")[0]
        info = json.loads(archive.read(f"{top}/adapter.json"))
    return names, info


def test_dylora_package_downloads_at_the_rank_chosen_in_share(studio_server):
    client, workspace = studio_server.session()
    record = _train(client, workspace, "cat-dy", "dylora")
    assert record["status"] == "done" and record["settings"]["adapter"] == "dylora"
    library = studio_server.studio.library(workspace)
    assert library.rank_range("cat-dy") == (1, 4, 4)  # what the Share tab's rank control offers

    download, _ = client.predict(workspace, "cat-dy", 2, api_name="/export")
    names, info = _zip_info(download)
    assert "cat-dy-r2/pytorch_lora_weights.safetensors" in names and "cat-dy-r2/style.safetensors" in names
    assert not any(n.endswith("dylora.safetensors") for n in names)
    assert info["rank"] == 2 and info["adapter"]["type"] == "dylora" and info["adapter"]["rank_range"] == [1, 4]

    whole, _ = client.predict(workspace, "cat-dy", 4, api_name="/export")  # its own rank: the package itself
    names, info = _zip_info(whole)
    assert "cat-dy/dylora.safetensors" in names and info["rank"] == 4

    with pytest.raises(AppError, match=r"outside the DyLoRA range \[1, 4\]"):
        client.predict(workspace, "cat-dy", 9, api_name="/export")
    with pytest.raises(AppError, match="whole number"):
        client.predict(workspace, "cat-dy", 2.5, api_name="/export")
    # The library holds only what training made: an export at a rank is a download, not a new package.
    assert {p.name for p in studio_server.studio.workspace_of(workspace).packages.iterdir()} == {"cat-dy"}


def test_an_adapter_the_method_cannot_train_is_refused(studio_server):
    client, workspace = studio_server.session()
    image = handle_file(str(EXAMPLES / "cat.jpg"))
    with pytest.raises(AppError, match="trains with lora adapters, not 'dylora'"):
        client.predict(workspace, image, "splitflux", "tiny-flux", "", 3, 4, 1e-4, 0, 0, "", "dylora",
                       api_name="/train")
    with pytest.raises(AppError, match="not 'adalora'"):
        client.predict(workspace, image, "b-lora", "tiny-sdxl", "", 3, 4, 1e-4, 0, 0, "", "adalora",
                       api_name="/train")
    assert studio_server.studio.jobs.jobs(workspace) == []


def test_share_offers_no_rank_control_for_a_plain_or_an_exported_package(cat_package, tmp_path):
    import shutil

    from studio.library import Library
    from studio.workspace import Workspace, new_workspace_id

    workspace = Workspace(new_workspace_id(tmp_path), tmp_path)
    shutil.copytree(cat_package, workspace.packages / "cat")
    library = Library(workspace, shared=tmp_path / "none")
    assert library.rank_range("cat") is None
    with pytest.raises(ValueError, match="plain LoRA package"):
        library.export_zip("cat", rank=2)
    assert library.export_zip("cat").name == "cat.zip"  # without a rank: the package as it is


def test_a_push_sends_the_package_at_the_rank_chosen_in_share(studio_server, monkeypatch):
    """The rank control applies to the Hub push as to the zip; the library keeps only the trained package."""
    import huggingface_hub.constants
    from safetensors.torch import load

    from tests.hub_standin import HUB_TOKEN

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the stand-in on 127.0.0.1 only
    client, workspace = studio_server.session()
    assert _train(client, workspace, "cat-sm", "dylora")["status"] == "done"
    client.predict(workspace, "cat-sm", "alice/cat-r2", True, HUB_TOKEN, 2, api_name="/push")
    files = studio_server.hub.repos["alice/cat-r2"]["files"]
    assert json.loads(files["adapter.json"])["rank"] == 2 and "dylora.safetensors" not in files
    weights = load(files["pytorch_lora_weights.safetensors"])
    assert {t.shape[0] for k, t in weights.items() if k.endswith("lora.down.weight")} == {2}
    client.predict(workspace, "cat-sm", "alice/cat-whole", True, HUB_TOKEN, api_name="/push")  # no rank: as it is
    assert "dylora.safetensors" in studio_server.hub.repos["alice/cat-whole"]["files"]
    assert {p.name for p in studio_server.studio.workspace_of(workspace).packages.iterdir()} == {"cat-sm"}
