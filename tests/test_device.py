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


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_calibrate_without_cuda_is_one_line(tmp_path) -> None:
    from merganser.calibrate import CalibrationOptions, calibrate

    out = tmp_path / "stats.safetensors"
    with pytest.raises(merganser.MerganserError, match="CUDA is not available"):
        calibrate(tmp_path / "nowhere", ["x"], out, CalibrationOptions(device="cuda"))
    assert not out.exists()


def test_unknown_device_is_one_line(tmp_path) -> None:
    m = write_model(tmp_path / "m", {"w": torch.ones(2)})
    with pytest.raises(merganser.MerganserError, match="expected cpu or cuda"):
        merganser.merge(
            {"merge_method": "linear", "models": [{"model": str(m)}]},
            tmp_path / "o",
            merganser.MergeOptions(device="tpu"),
        )
