"""Asking for CUDA where there is none is a clear error, not a crash."""

from __future__ import annotations

import pytest
import torch
from conftest import write_model

import merganser

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")


@pytest.mark.parametrize(
    ("device", "message"),
    [pytest.param("cuda", "CUDA is not available", marks=NO_CUDA), ("tpu", "expected cpu or cuda")],
)
def test_device_errors_are_one_line_and_write_nothing(tmp_path, device, message) -> None:
    m = write_model(tmp_path / "m", {"w": torch.ones(2)})
    with pytest.raises(merganser.MerganserError, match=message):
        merganser.merge(
            {"merge_method": "linear", "models": [{"model": str(m)}]},
            tmp_path / "o",
            merganser.MergeOptions(device=device),
        )
    assert not (tmp_path / "o").exists()


@NO_CUDA
def test_calibrate_without_cuda_is_one_line(tmp_path) -> None:
    from merganser.evaluation.calibrate import CalibrationOptions, calibrate

    out = tmp_path / "stats.safetensors"
    with pytest.raises(merganser.MerganserError, match="CUDA is not available"):
        calibrate(tmp_path / "nowhere", ["x"], out, CalibrationOptions(device="cuda"))
    assert not out.exists()
