"""CBQ: cross-block post-training quantisation with LoRA-Rounding and coarse-to-fine outlier preprocessing.

`layer.py` holds the config and the quantised layer (and registers the method); `calibrate.py` the outlier
preprocessing and the window-by-window reconstruction.
"""

from pipelines.adapters.cbq.calibrate import (
    CBQReport,
    block_output_errors,
    cbq_calibrate,
    outlier_threshold,
    window_loss,
    window_starts,
)
from pipelines.adapters.cbq.layer import CBQConfig, CBQLinear, rectified_sigmoid

__all__ = [
    "CBQConfig",
    "CBQLinear",
    "CBQReport",
    "block_output_errors",
    "cbq_calibrate",
    "outlier_threshold",
    "rectified_sigmoid",
    "window_loss",
    "window_starts",
]
