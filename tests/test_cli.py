"""The `blockstudio` command line: bad input gets one line and a non-zero exit, and leaves nothing behind."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from studio.cli import EXIT_BAD_INPUT, main
from tests.conftest import EXAMPLES


def _train(args, tmp_path):
    return main(["train", "blora", "--model", "tiny-sdxl", "--steps", "2", "--rank", "4", *args])


def _assert_clean_refusal(rc, capsys, tmp_path, pattern, *, keep=()):
    err = capsys.readouterr().err.strip()
    assert rc == EXIT_BAD_INPUT
    assert err.startswith("blockstudio: error:") and len(err.splitlines()) == 1, err
    assert pattern in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def _png_with_size(path, width, height):
    """A valid PNG header claiming a huge size (a decompression bomb); the pixel data is never reached."""
    Image.new("RGB", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def test_not_an_image_is_refused(tmp_path, capsys):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is text")
    rc = _train(["--image", str(bad), "--out", str(tmp_path / "out")], tmp_path)
    _assert_clean_refusal(rc, capsys, tmp_path, "not an image", keep=["notes.jpg"])


def test_truncated_image_is_refused(tmp_path, capsys):
    data = (EXAMPLES / "cat.jpg").read_bytes()
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(data[: len(data) // 3])
    rc = _train(["--image", str(bad), "--out", str(tmp_path / "out")], tmp_path)
    _assert_clean_refusal(rc, capsys, tmp_path, "truncated", keep=["cut.jpg"])


def test_too_small_image_is_refused(tmp_path, capsys):
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 200), "red").save(small)
    rc = _train(["--image", str(small), "--out", str(tmp_path / "out")], tmp_path)
    _assert_clean_refusal(rc, capsys, tmp_path, "at least 64 pixels", keep=["small.png"])


def test_decompression_bomb_is_refused(tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    _png_with_size(bomb, 60000, 60000)
    rc = _train(["--image", str(bomb), "--out", str(tmp_path / "out")], tmp_path)
    _assert_clean_refusal(rc, capsys, tmp_path, "too large", keep=["bomb.png"])


def test_wrong_file_type_is_refused(tmp_path, capsys):
    icon = tmp_path / "image.ico"
    Image.new("RGB", (128, 128)).save(icon)
    rc = _train(["--image", str(icon), "--out", str(tmp_path / "out")], tmp_path)
    _assert_clean_refusal(rc, capsys, tmp_path, "not accepted", keep=["image.ico"])


def test_unwritable_out_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a folder should be")
    rc = _train(["--image", str(EXAMPLES / "cat.jpg"), "--out", str(blocker / "pkg")], tmp_path)
    _assert_clean_refusal(rc, capsys, tmp_path, "not writable", keep=["file.txt"])


@pytest.mark.parametrize("token", ["../../etc", "two words", "[c]"])
def test_unsafe_token_is_refused(token, tmp_path, capsys):
    rc = _train(["--image", str(EXAMPLES / "cat.jpg"), "--out", str(tmp_path / "out"), "--token", token], tmp_path)
    _assert_clean_refusal(rc, capsys, tmp_path, "token")


@pytest.mark.parametrize("name", [".hidden", "my pkg", "a$b"])
def test_unsafe_package_name_is_refused(name, tmp_path, capsys):
    rc = _train(["--image", str(EXAMPLES / "cat.jpg"), "--out", str(tmp_path / name)], tmp_path)
    _assert_clean_refusal(rc, capsys, tmp_path, "name")


def test_offline_hub_model_error_names_the_model_and_the_offline_choice(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    rc = main(["train", "blora", "--image", str(EXAMPLES / "cat.jpg"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT
    assert "stabilityai/stable-diffusion-xl-base-1.0" in err and "--model tiny-sdxl" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_generate_refuses_a_placeholder_without_adapter(cat_package, tmp_path, capsys):
    rc = main(["generate", "--model", "tiny-sdxl", "--content", str(cat_package), "--prompt", "A [c] in [s] style",
               "--out", str(tmp_path / "x.png")])
    _assert_clean_refusal(rc, capsys, tmp_path, "no style adapter")


def test_generate_refuses_a_folder_that_is_not_a_package(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["generate", "--content", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")])
    _assert_clean_refusal(rc, capsys, tmp_path, "not an adapter package", keep=["empty"])


def test_train_generate_and_import_end_to_end(tmp_path, capsys):
    out = tmp_path / "rocket"
    rc = main(["train", "blora", "--model", "tiny-sdxl", "--image", str(EXAMPLES / "rocket.jpg"), "--out", str(out),
               "--steps", "3", "--rank", "4", "--sample-steps", "2", "--token", "[v5]"])
    assert rc == 0 and (out / "adapter.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rocket"]  # no .partial, no staging folders
    rc = main(["generate", "--content", str(out), "--style", str(out), "--steps", "2", "--out", str(tmp_path / "g.png")])
    assert rc == 0 and Image.open(tmp_path / "g.png").size == (64, 64)
    rc = main(["import", str(out / "kohya" / "rocket.safetensors"), "--model", "tiny-sdxl",
               "--out", str(tmp_path / "again")])
    assert rc == 0
    assert '"token": "[v5]"' in (tmp_path / "again" / "adapter.json").read_text()  # from the file's metadata
    capsys.readouterr()
    assert main(["inspect", str(out / "style.safetensors")]) == 0
    assert '"blockstudio.part": "style"' in capsys.readouterr().out


def test_console_script_exit_code_and_models_path(tiny_sdxl_path):
    result = subprocess.run([sys.executable, "-m", "studio.cli", "models", "path", "tiny-sdxl"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.strip() == str(tiny_sdxl_path)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(result.stdout.strip())
    assert len(pipe.unet.up_blocks[0].attentions) == 3
    bad = subprocess.run([sys.executable, "-m", "studio.cli", "models", "path", "no-such-model"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == EXIT_BAD_INPUT and "unknown model" in bad.stderr


def test_training_runs_under_accelerate_launch_with_previews(tmp_path):
    out = tmp_path / "cat"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "-m", "studio.cli",
         "train", "blora", "--image", str(EXAMPLES / "cat.jpg"), "--out", str(out), "--model", "tiny-sdxl",
         "--steps", "4", "--rank", "4", "--sample-steps", "2", "--sample-every", "2", "--keep-checkpoints"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    previews = sorted(p.name for p in (tmp_path / "cat.partial" / "samples").iterdir())
    assert previews == ["step-000002.png", "step-000004.png"]
