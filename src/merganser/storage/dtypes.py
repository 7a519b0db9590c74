"""Mapping between safetensors dtype codes, user-facing names and torch dtypes."""

from __future__ import annotations

import functools

import torch

from merganser.errors import RecipeError

# safetensors header code -> torch dtype
ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}

_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(name: str, where: str) -> torch.dtype:
    """Turn a recipe dtype name ('bfloat16', 'fp16', ...) into a torch dtype."""
    try:
        return _NAMES[name.lower()]
    except KeyError:
        raise RecipeError(
            f"{where}: unknown dtype {name!r} (expected one of: float32, float16, bfloat16)"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    """The name transformers writes in config.json ('bfloat16', 'float32', ...)."""
    return str(dtype).removeprefix("torch.")


@functools.cache
def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
