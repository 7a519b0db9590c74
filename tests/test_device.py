"""Asking for CUDA where there is none is a clear error, not a crash."""

from __future__ import annotations

import pytest
import torch
from conftest import write_model

import merganser


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_no_cuda_error(tmp_path) -> None:
    m = write_model(tmp_path / "m", {"w": torch.ones(2)})
    with pytest.raises(merganser.MerganserError, match="CUDA is not available"):
        merganser.merge(
            {"merge_method": "linear", "models": [{"model": str(m)}]},
            tmp_path / "o",
            merganser.MergeOptions(device="cuda"),
        )
    assert not (tmp_path / "o").exists()
