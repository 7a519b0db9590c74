"""Models named by Hugging Face hub id (``org/name``, optionally ``@revision``), found in the
local Hugging Face cache or downloaded into it through huggingface_hub.

A download happens only for a hub id that is not a local path, and never in offline mode
(``--offline`` or ``HF_HUB_OFFLINE=1``), where a model missing from the cache is one line.
Only weights, configs and tokenizer files are fetched; no code is ever run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from merganser.errors import CheckpointError

# The hub's repository ids: a namespace and a name of letters, digits, '-', '_' and '.'.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}(@[\w./-]{1,128})?")
# What a merge reads from a repository; torch weights only where it has no safetensors.
PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.jinja",
    "*.txt",
    "*.model",
    "1_Pooling/*",
]
TORCH_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def is_hub_id(ref: str) -> bool:
    """Whether ``ref`` has the form of a hub id (``org/name`` or ``org/name@revision``)."""
    return bool(_HUB_ID.fullmatch(ref)) and ".." not in ref


def offline_mode(offline: bool = False) -> bool:
    """Offline when asked, or when ``HF_HUB_OFFLINE`` says so (as huggingface_hub reads it)."""
    return offline or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def resolve(ref: str, offline: bool = False) -> Path:
    """The local folder of hub model ``ref``: its cached snapshot, downloaded first unless
    offline. Any failure is one line naming ``ref``.
    """
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise CheckpointError(
            f"{ref}: no such local folder, and huggingface_hub is not installed to find it on "
            "the hub"
        ) from None
    repo, _, revision = ref.partition("@")
    local_only = offline_mode(offline)
    try:
        path = Path(
            snapshot_download(
                repo,
                revision=revision or None,
                local_files_only=local_only,
                allow_patterns=PATTERNS,
            )
        )
        if not any(path.glob("*.safetensors")):
            path = Path(
                snapshot_download(
                    repo,
                    revision=revision or None,
                    local_files_only=local_only,
                    allow_patterns=PATTERNS + TORCH_PATTERNS,
                )
            )
    except LocalEntryNotFoundError:
        why = "offline mode is on (--offline or HF_HUB_OFFLINE=1)" if local_only else "no network"
        raise CheckpointError(
            f"{ref}: no such local folder, and not in the Hugging Face cache ({why})"
        ) from None
    except GatedRepoError:
        raise CheckpointError(
            f"{ref}: the hub model is gated; accept its terms and log in (hf auth login)"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{ref}: the hub model has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{ref}: no such local folder, and no such model on the Hugging Face hub"
        ) from None
    except Exception as e:  # network and server failures, whatever their type
        text = str(e).strip().splitlines()
        raise CheckpointError(
            f"{ref}: cannot fetch from the Hugging Face hub ({type(e).__name__}: "
            f"{text[0][:200] if text else 'no details'})"
        ) from None
    return path
