"""Gates between a model and its parent: outputs on real test images must agree."""
from __future__ import annotations

import numpy as np

from . import metrics
from .errors import PipelineError


def conversion_report(name: str, parent: np.ndarray, child: np.ndarray,
                      max_abs_diff: float, min_agreement: float) -> dict:
    """Compare child scores with parent scores; raise if they drift beyond the limits."""
    report = metrics.comparison(parent, child)
    report["images"] = int(len(parent))
    if report["max_abs_diff"] > max_abs_diff or report["argmax_agreement"] < min_agreement:
        raise PipelineError(
            f"{name}: outputs drift from the parent model: max |softmax diff| "
            f"{report['max_abs_diff']:.3g} (limit convert.max_abs_diff {max_abs_diff}), argmax "
            f"agreement {report['argmax_agreement']:.4f} (limit convert.min_agreement {min_agreement})")
    return report
