"""Calibration: the only code that runs the model to collect statistics."""

from lowbit.calib.batches import as_batches
from lowbit.calib.observe import (
    StaticCalibration,
    calibrate_static,
    observe_inputs,
    set_input_qparams,
)

__all__ = [
    "StaticCalibration",
    "as_batches",
    "calibrate_static",
    "observe_inputs",
    "set_input_qparams",
]
