"""Where the arithmetic runs: validated once, with a one-line error, before any heavy work."""

from __future__ import annotations

import torch

from merganser.errors import MerganserError


def check_device(name: str) -> torch.device:
    """``name`` as a torch device, or a one-line error if this machine does not have it."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise MerganserError(f"--device {name}: expected cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MerganserError(f"--device {name}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MerganserError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type != "cpu":
        raise MerganserError(f"--device {name}: expected cpu or cuda[:N]")
    return dev
