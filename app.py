"""Hugging Face Space entry point: build the studio and serve it on all interfaces (the platform picks the port)."""

from studio.app import launch

if __name__ == "__main__":
    launch(host="0.0.0.0", port=None)
