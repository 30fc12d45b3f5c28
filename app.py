"""Hugging Face Space entry point: build the studio and launch it."""

from studio.app import launch

if __name__ == "__main__":
    launch(host="0.0.0.0")
