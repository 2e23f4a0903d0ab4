"""Producing quantized checkpoints: `quantize(QuantizeConfig)` (pipeline) runs the layer-by-layer driver
(layerwise) with one method's LayerQuantizer (weight_only, gptq_layer, awq, smoothquant) over calibration windows
(data)."""
from quantkit.calibrate.config import QuantizeConfig
from quantkit.calibrate.data import CalibrationConfig, calibration_data, heldout_windows
from quantkit.calibrate.pipeline import QuantizeSummary, quantize

__all__ = ["CalibrationConfig", "QuantizeConfig", "QuantizeSummary", "calibration_data", "heldout_windows",
           "quantize"]
