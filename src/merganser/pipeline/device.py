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


# Share of a GPU's free memory a merge's items may hold at once: the rest absorbs the caching
# allocator's fragmentation and temporaries a method's per-entry estimate leaves out.
GPU_SHARE = 0.8


def default_device_budget(name: str) -> int | None:
    """Bytes of GPU memory a merge on ``name`` may hold at once; None off a GPU (check_device
    is what rejects a GPU this machine lacks).
    """
    dev = torch.device(name)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(dev)
    return int(free * GPU_SHARE)
