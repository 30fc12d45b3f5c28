"""Workspaces and the library on disk: paths stay inside, packages are written whole or not at all."""

from __future__ import annotations

import os
import zipfile

import pytest

from pipelines.errors import UnsafeName
from studio.library import Library, LibraryError, slug
from studio.workspace import Workspace, WorkspaceError, inside, new_workspace_id


def test_workspace_ids_are_long_random_and_checked(tmp_path):
    ids = {new_workspace_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 32 for i in ids)
    for bad in ("", "short", "../" + "a" * 29, "a/" + "b" * 30, None):
        with pytest.raises(WorkspaceError):
            Workspace(bad, tmp_path)


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../b", "a\\b", "", "a/\x00"])
def test_paths_that_leave_the_folder_are_refused(tmp_path, path):
    with pytest.raises(UnsafeName):
        inside(tmp_path, path)


def test_a_link_planted_inside_cannot_lead_outside(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(tmp_path, root / "escape")
    with pytest.raises(UnsafeName, match="outside"):
        inside(root, "escape/secret")


def test_messages_lose_the_server_paths(tmp_path):
    workspace = Workspace(new_workspace_id(tmp_path), tmp_path)
    text = f"{workspace.packages / 'cat'} is not a package; see {tmp_path / 'tiny'}"
    assert workspace.scrub(text) == "cat is not a package; see <data>/tiny"


def test_package_names_come_from_file_names_and_never_collide(tmp_path):
    library = Library(Workspace(new_workspace_id(tmp_path), tmp_path), shared=tmp_path / "none")
    assert slug("My cat (2).JPG") == "My-cat-2-JPG" and slug("...") == "adapter"
    (library.workspace.packages / "cat.partial").mkdir()
    assert library.unique_name("cat") == "cat-2"
    assert library.unique_name("cat", taken={"cat-2"}) == "cat-3"


def test_a_zip_with_a_link_is_refused_and_leaves_nothing_behind(tmp_path):
    library = Library(Workspace(new_workspace_id(tmp_path), tmp_path), shared=tmp_path / "none")
    upload = tmp_path / "link.zip"
    with zipfile.ZipFile(upload, "w") as archive:
        info = zipfile.ZipInfo("pkg/adapter.json")
        info.external_attr = (0o120777 << 16)
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(LibraryError, match="links are not allowed"):
        library.import_file(upload)
    assert list(library.workspace.packages.iterdir()) == []


def test_shared_packages_are_listed_but_read_only(tmp_path, cat_package):
    import shutil

    shared = tmp_path / "shared"
    shutil.copytree(cat_package, shared / "cat")
    library = Library(Workspace(new_workspace_id(tmp_path), tmp_path), shared=shared)
    assert [s.name for s in library.list()] == ["shared:cat"]
    assert library.open("shared:cat").token.startswith("[v")
    with pytest.raises(LibraryError, match="read-only"):
        library.delete("shared:cat")
    with pytest.raises(LibraryError, match="read-only"):
        library.rename("shared:cat", "mine")
    assert (shared / "cat" / "adapter.json").is_file()


def test_the_browser_key_survives_a_restart_and_stays_private(tmp_path, monkeypatch):
    from studio.app import browser_secret

    monkeypatch.delenv("BLOCKSTUDIO_SECRET", raising=False)
    first = browser_secret(tmp_path)
    assert browser_secret(tmp_path) == first and len(first) >= 32
    assert (tmp_path / "browser-secret").stat().st_mode & 0o077 == 0
