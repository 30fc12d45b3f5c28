"""Push an adapter package to the Hugging Face Hub as a model repository.

The package folder already is a Hub model repo: its README.md is the model card, with front matter and
widgets pointing at `samples/`. The token comes from `HF_TOKEN` or is typed for one push; it is passed to
`huggingface_hub` for that call only, never written anywhere, and masked in every message.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pipelines.errors import BlockStudioError
from pipelines.package import has_links

_REPO_RE = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# Things that never belong on the Hub: unfinished runs, staging folders, editor leftovers.
IGNORE = [".*", "**/.*", "*.partial/**", "*.tmp"]


class HubError(BlockStudioError):
    """The push did not happen; the message says why (with any token masked)."""


@dataclass
class PushResult:
    repo_url: str
    commit_url: str
    files: int


def mask(text: str, *secrets: str | None) -> str:
    """`text` with every secret replaced, and anything shaped like a Hub token too."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "hf_***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)


def resolve_token(typed: str | None) -> str:
    token = (typed or "").strip() or os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise HubError("no Hugging Face token: enter a write token for this push, or set HF_TOKEN on the server")
    if any(c.isspace() for c in token) or len(token) > 512:
        raise HubError("that does not look like a Hugging Face token")
    return token


def check_repo_id(repo_id: str) -> str:
    repo_id = (repo_id or "").strip()
    if not _REPO_RE.fullmatch(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise HubError("repository must look like your-name/adapter-name (letters, digits, '-', '_', '.')")
    return repo_id


def _refused(exc: BaseException, repo_id: str) -> str | None:
    """What a refusal by the Hub means for the person pushing (a bad token, a repository they may not write to),
    in words; None for other errors."""
    from huggingface_hub.errors import HfHubHTTPError

    response = getattr(exc, "response", None) if isinstance(exc, HfHubHTTPError) else None
    status = getattr(response, "status_code", None)
    if status == 401:
        return ("the Hub refused the token (401 Unauthorized): use a write token from "
                "https://huggingface.co/settings/tokens, or set HF_TOKEN on the server")
    if status == 403:
        return (f"the token may not write to {repo_id} (403 Forbidden): push to a repository under your own name or "
                "an organisation the token can write to, or use a token with write access")
    return None


def _unreachable(exc: BaseException, endpoint: str) -> str | None:
    """Why the Hub could not be asked at all (offline mode, no network, no such host, a timeout), in words; None
    when the Hub answered (an HTTP error such as 401 says what the Hub said)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, HfHubHTTPError):
        return None
    if isinstance(exc, OfflineModeIsEnabled):
        return "this server runs with HF_HUB_OFFLINE set, so it does not contact the Hub; unset it to push"
    host = urlsplit(endpoint).netloc or endpoint
    seen: BaseException | None = exc
    while seen is not None:
        transport = any(k.__name__ == "TransportError" for k in type(seen).__mro__)
        if transport or isinstance(seen, (ConnectionError, socket.gaierror, TimeoutError)):
            return (f"the Hub ({host}) cannot be reached from this server; check its network connection "
                    "(or HF_ENDPOINT) and push again")
        seen = seen.__cause__ or seen.__context__
    return None


def push_package(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool = True,
                 endpoint: str | None = None) -> PushResult:
    """Create (or reuse) the model repo and upload the package folder in one commit."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "adapter.json").is_file() or not (folder / "README.md").is_file():
        raise HubError(f"{folder.name} is not a complete adapter package (adapter.json and README.md needed)")
    if has_links(folder):
        # upload_folder would follow them and publish whatever they point at.
        raise HubError(f"{folder.name} holds links to other files, which are never uploaded; remove them first")
    repo_id = check_repo_id(repo_id)
    secret = resolve_token(token)
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None)
    files = sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    try:
        url = api.create_repo(repo_id, token=secret, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=url.repo_id, folder_path=folder, token=secret, repo_type="model", ignore_patterns=IGNORE,
            commit_message=f"Upload {folder.name} adapter package from Block Studio",
        )
    except Exception as exc:
        reason = _unreachable(exc, api.endpoint) or _refused(exc, repo_id)
        if reason:
            raise HubError(f"push to {repo_id} failed: {reason}") from None
        # Errors from the HTTP stack can echo headers or URLs; none of it may carry the token out.
        detail = mask(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, secret)
        raise HubError(f"push to {repo_id} failed: {detail[:300]}") from None
    return PushResult(repo_url=str(url), commit_url=commit.commit_url, files=files)
