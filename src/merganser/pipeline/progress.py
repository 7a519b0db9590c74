"""A progress bar on terminals (tensors, bytes, rate, ETA); silent in pipes."""

from __future__ import annotations

import sys
import threading
from types import TracebackType

from tqdm import tqdm


class Progress:
    def __init__(self, total_bytes: int, total_items: int, enabled: bool | None = None):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bar = (
            tqdm(
                total=total_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc="merging",
                dynamic_ncols=True,
                file=sys.stderr,
            )
            if enabled
            else None
        )
        self._items = 0
        self._total_items = total_items
        self._lock = threading.Lock()

    @property
    def items(self) -> int:
        return self._items

    def update(self, nbytes: int, item_done: bool = True) -> None:
        """``nbytes`` more written; ``item_done``: a work item (a piece) is finished."""
        with self._lock:
            self._items += item_done
            if self._bar is None:
                return
            self._bar.set_postfix_str(f"{self._items}/{self._total_items} pieces", refresh=False)
            self._bar.update(nbytes)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.close()
