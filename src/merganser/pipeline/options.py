"""The options of a merge run: one dataclass that is both the API's ``MergeOptions`` and the
source of `merganser merge`'s flags, their defaults and their help (cli.py builds the flags
from it). No torch here: `merganser --help` must not import it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from merganser.storage.pagecache import READ_MODES, ReadMode

if TYPE_CHECKING:
    from merganser.pipeline.engine import EngineOptions


def default_threads(device: str) -> int:
    """Worker threads when none are asked for: on a CPU, the count measured on this machine
    (pipeline/threads.py: past the memory system's saturation, more threads only add
    buffers); for a GPU merge, one per core, which kept gaining there (docs/performance.md).
    """
    cores = os.cpu_count() or 1
    if device != "cpu":
        return cores
    from merganser.pipeline.threads import measured_threads

    return measured_threads(cores)


def default_memory_budget() -> int:
    """Half of physical memory (a cap on tensors in flight, not a reservation)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError):
        return 4 << 30


def flag(help: str, kind: str | None = None, name: str | None = None, **extra: Any) -> Any:
    """Field metadata for a CLI flag: its help, how its value is parsed (``size``,
    ``positive``, ``non_negative``), and its name where it is not ``--field-name``.
    """
    return {"help": help, "kind": kind, "name": name, **extra}


@dataclass(frozen=True)
class MergeOptions:
    """Knobs of a merge run; every field is also a flag of `merganser merge`."""

    out_shard_size: int = field(
        default=5 * 10**9, metadata=flag("largest output shard (default 5GB)", "size")
    )
    memory_budget: int | None = field(
        default=None,
        metadata=flag("cap on tensor memory in flight (default: half of RAM)", "size"),
    )
    threads: int | None = field(
        default=None,
        metadata=flag(
            "worker threads (default: measured once per machine on cpu, the cores for a gpu)",
            "positive",
        ),
    )
    torch_threads: int = field(
        default=1, metadata=flag("torch intra-op threads per worker (default 1)", "positive")
    )
    read_ahead: int = field(
        default=1,
        metadata=flag(
            "work items each worker thread reads ahead in elementwise merges, so that cold "
            "inputs have more reads in flight (default 1)",
            "non_negative",
        ),
    )
    read_streams: int = field(
        default=4,
        metadata=flag(
            "inputs of one tensor each worker thread reads side by side in TIES, DARE, SLERP "
            "and other multi-pass merges, so that cold inputs have more reads in flight "
            "(default 4)",
            "positive",
        ),
    )
    device: str = field(default="cpu", metadata=flag("where the math runs: cpu or cuda[:N]"))
    gpu_memory: int | None = field(
        default=None,
        metadata=flag(
            "cap on GPU memory in flight with --device cuda; a tensor that needs more is "
            "merged on the CPU (default: 80%% of the GPU's free memory)",
            "size",
        ),
    )
    force: bool = field(default=False, metadata=flag("replace a non-empty output folder"))
    allow_nonfinite: bool = field(
        default=False, metadata=flag("write NaN/Inf results instead of stopping")
    )
    fused: bool = field(
        default=True,
        metadata=flag(
            "do TIES/DARE/SLERP math with torch instead of the fused numba kernels",
            name="--no-fused",
        ),
    )
    progress: bool | None = field(
        default=None,
        metadata=flag("show a progress bar (default: on a terminal)", name="--progress"),
    )
    input_checksums: bool = field(
        default=True,
        metadata=flag(
            "skip hashing the input tensors for the model card", name="--no-input-checksums"
        ),
    )
    read_mode: ReadMode = field(
        default="auto",
        metadata=flag(
            "auto (default): inputs the page cache holds are read from it, the rest with "
            "O_DIRECT, leaving the cache alone; cache: always through the page cache, which "
            "keeps the inputs cached for another run; direct: always O_DIRECT",
            name="--read",
            choices=READ_MODES,
        ),
    )
    output: str = field(
        default="model",
        metadata=flag(
            "model (default) or adapter: with every input a LoRA adapter of one base, write "
            "a PEFT adapter (exact at the default rank for methods linear in ΔW)",
            choices=("model", "adapter"),
        ),
    )
    adapter_rank: int | None = field(
        default=None,
        metadata=flag(
            "with --output adapter: the rank of each module (default: the inputs' ranks "
            "summed, which is exact for linear and task_arithmetic)",
            "positive",
        ),
    )
    intermediate_dir: str | None = field(
        default=None,
        metadata=flag(
            "where the named merges of a multi-document recipe go (default: OUT.intermediate "
            "beside the output); one already there from the same document is reused"
        ),
    )
    offline: bool = field(
        default=False,
        metadata=flag(
            "never download: a hub id (org/name[@revision]) must be in the Hugging Face cache "
            "(HF_HUB_OFFLINE=1 does the same)"
        ),
    )
    report: bool = field(
        default=False,
        metadata=flag(
            "also write OUT.report.html beside the output: the inputs' task vectors, their "
            "conflicts and how far the merge moved from each (merganser report)"
        ),
    )
    # Warnings (a parameter a method ignores, a filter that matches no tensor) become errors.
    strict: bool = field(
        default=False,
        metadata=flag(
            "make warnings errors: a parameter the method ignores, a filter matching no tensor"
        ),
    )

    def engine_options(self) -> EngineOptions:
        from merganser.pipeline.device import default_device_budget
        from merganser.pipeline.engine import EngineOptions

        return EngineOptions(
            memory_budget=self.memory_budget or default_memory_budget(),
            threads=self.threads or default_threads(self.device),
            torch_threads=self.torch_threads,
            read_ahead=self.read_ahead,
            read_streams=self.read_streams,
            device=self.device,
            device_budget=self.gpu_memory or default_device_budget(self.device),
            allow_nonfinite=self.allow_nonfinite,
            fused=self.fused,
        )


def option_fields() -> list[Any]:
    """The fields of MergeOptions with their flag metadata, in declaration order."""
    return list(fields(MergeOptions))
