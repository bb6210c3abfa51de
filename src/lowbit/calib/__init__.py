"""Calibration: the only code that runs the model to collect statistics."""

from lowbit.calib.batches import as_batches
from lowbit.calib.observe import (
    StaticCalibration,
    calibrate_static,
    observe_inputs,
    set_input_qparams,
)
from lowbit.calib.sensitivity import (
    MixedPlan,
    Sensitivity,
    allocate_bits,
    measure_sensitivity,
    mixed_precision,
)

__all__ = [
    "MixedPlan",
    "Sensitivity",
    "StaticCalibration",
    "allocate_bits",
    "as_batches",
    "calibrate_static",
    "measure_sensitivity",
    "mixed_precision",
    "observe_inputs",
    "set_input_qparams",
]
