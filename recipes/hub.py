"""Pushing a finished run's `final/` directory to the Hugging Face Hub as one commit.

The upload is exactly the files under `final/` (model, tokenizer, config.yaml,
results, model card, report), at the same relative paths. Any failure to
reach or write to the hub (offline, no token, no permission) is one
`HubPushError` naming the hub and the repository; training outputs are
already on disk by then.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants

REPO_ID_HELP = "a hub repository id: 'name' (in your namespace) or 'user-or-org/name'"


class HubPushError(RuntimeError):
    """The push did not happen; the message says where it was going and why not, in one line."""


def check_repo_id(repo_id: str) -> None:
    """Raise ValueError unless `repo_id` looks like 'name' or 'owner/name'."""
    parts = repo_id.split("/")
    if len(parts) > 2 or not all(parts) or any(part.startswith((".", "-")) for part in parts):
        raise ValueError(f"--hub_model_id {repo_id!r}: expected {REPO_ID_HELP}")


def upload_operations(directory: str | Path) -> list[CommitOperationAdd]:
    """One add operation per file under `directory`, at its path relative to it (sorted)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory to push")
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return [CommitOperationAdd(path_in_repo=p.relative_to(directory).as_posix(), path_or_fileobj=str(p))
            for p in files]  # fmt: skip


def push_directory(directory: str | Path, repo_id: str, *, private: bool = False, message: str | None = None) -> str:
    """Create (if needed) the model repository `repo_id` and commit `directory`'s files to it; returns its URL."""
    check_repo_id(repo_id)
    operations = upload_operations(directory)
    endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT)
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(url.repo_id, operations, commit_message=message or f"Upload {Path(directory).name}")
    except Exception as error:  # offline, unauthenticated, forbidden, ...: the hub client's errors vary by cause
        reason = " ".join(str(error).split()) or type(error).__name__
        raise HubPushError(f"could not push {directory} to {repo_id} on the hub at {endpoint}: {reason}") from error
    return str(url)
