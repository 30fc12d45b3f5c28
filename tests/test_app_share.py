"""Export and Hub push through the API: zip contents, a push to a local Hub stand-in, the token never kept."""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from pathlib import Path

import pytest
from gradio_client.exceptions import AppError

from tests.conftest import path_of
from tests.hub_standin import HUB_TOKEN


@pytest.fixture(autouse=True)
def hub_reachable(monkeypatch):
    """The suite runs with HF_HUB_OFFLINE=1; pushes here only reach the stand-in on 127.0.0.1."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_export_zip_holds_diffusers_and_kohya_files_card_metadata_and_samples(trained):
    client, workspace = trained
    download, table = client.predict(workspace, "cat", api_name="/export")
    with zipfile.ZipFile(path_of(download)) as archive:
        names = set(archive.namelist())
    assert {
        "cat/pytorch_lora_weights.safetensors", "cat/content.safetensors", "cat/style.safetensors",
        "cat/kohya/cat.safetensors", "cat/kohya/cat_content.safetensors", "cat/kohya/cat_style.safetensors",
        "cat/adapter.json", "cat/README.md", "cat/samples/full.png", "cat/samples/input.png",
    } <= names
    assert "`cat/README.md`" in table


def _files_containing(root: Path, secret: bytes) -> list[Path]:
    hits = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and secret in path.read_bytes():
                hits.append(path)
        except OSError:
            continue
    return hits


def test_push_sends_the_package_with_its_card_and_keeps_no_token(trained, studio_server, caplog, capfd):
    client, workspace = trained
    hub = studio_server.hub
    caplog.set_level(logging.DEBUG)
    message = client.predict(workspace, "cat", "alice/cat-blora", True, HUB_TOKEN, api_name="/push")
    assert "alice/cat-blora" in message
    repo = hub.repos["alice/cat-blora"]
    assert repo["private"] and "pytorch_lora_weights.safetensors" in repo["files"]
    assert "kohya/cat_style.safetensors" in repo["files"] and "README.md" in repo["files"]
    widgets = [w["output"]["url"] for w in hub.cards[-1]["widget"]]
    assert widgets and all(url in repo["files"] for url in widgets)

    secret = HUB_TOKEN.encode()
    assert _files_containing(studio_server.studio.home, secret) == []
    gradio_cache = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    assert _files_containing(gradio_cache, secret) == []
    captured = capfd.readouterr()
    assert HUB_TOKEN not in captured.out + captured.err + caplog.text


def test_push_with_the_server_token_and_a_wrong_token_is_masked(trained, studio_server, monkeypatch):
    client, workspace = trained
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    client.predict(workspace, "coffee", "alice/coffee-blora", False, "", api_name="/push")
    assert "alice/coffee-blora" in studio_server.hub.repos
    wrong = "hf_WrongTokenWrongTokenWrong123"
    with pytest.raises(AppError) as error:
        client.predict(workspace, "coffee", "alice/other", False, wrong, api_name="/push")
    assert "401" in str(error.value) and wrong not in str(error.value)
    assert "use a write token" in str(error.value)  # what to do, not the HTTP client's wording


def test_push_to_a_namespace_the_token_cannot_write_says_so(trained, studio_server):
    from tests.hub_standin import FORBIDDEN_ORG

    client, workspace = trained
    with pytest.raises(AppError, match=rf"may not write to {FORBIDDEN_ORG}/cat \(403 Forbidden\)"):
        client.predict(workspace, "cat", f"{FORBIDDEN_ORG}/cat", True, HUB_TOKEN, api_name="/push")
    assert f"{FORBIDDEN_ORG}/cat" not in studio_server.hub.repos


def test_push_without_any_token_says_how_to_give_one(trained, monkeypatch):
    client, workspace = trained
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(AppError, match="no Hugging Face token"):
        client.predict(workspace, "cat", "alice/cat-again", True, "", api_name="/push")
