"""Calibration for `quantkit quantize`: calibration / held-out token windows (data) and GPTQ for one Linear
(gptq)."""
from quantkit.calibrate.data import CalibrationConfig, Windows, calibration_data, calibration_windows, heldout_windows
from quantkit.calibrate.gptq import GPTQConfig, GPTQResult, HessianAccumulator, dequantize, gptq_quantize

__all__ = ["CalibrationConfig", "GPTQConfig", "GPTQResult", "HessianAccumulator", "Windows", "calibration_data",
           "calibration_windows", "dequantize", "gptq_quantize", "heldout_windows"]
