"""Gates between a model and its parent: outputs on real test images must agree."""
from __future__ import annotations

import numpy as np

from . import metrics
from .errors import PipelineError


def conversion_report(name: str, parent: np.ndarray, child: np.ndarray,
                      max_abs_diff: float, min_agreement: float) -> dict:
    """Compare child scores with parent scores; raise if they drift beyond the limits. The report
    keeps the largest difference as the power of ten it stays below (the same on every machine);
    `max_abs_diff` is the exact figure on this machine, for printing, not for a metrics file."""
    report = metrics.comparison(parent, child)
    if report["max_abs_diff"] > max_abs_diff or report["argmax_agreement"] < min_agreement:
        raise PipelineError(
            f"{name}: outputs drift from the parent model: max |softmax diff| "
            f"{report['max_abs_diff']:.3g} (limit convert.max_abs_diff {max_abs_diff}), argmax "
            f"agreement {report['argmax_agreement']:.4f} (limit convert.min_agreement {min_agreement})")
    exact = report.pop("max_abs_diff")
    return {"max_abs_diff_below": metrics.power_of_ten_bound(exact), **report, "images": int(len(parent)),
            "max_abs_diff": exact}


def recorded(report: dict) -> dict:
    """What of a conversion report goes into a metrics file: everything but the exact float."""
    return {key: value for key, value in report.items() if key != "max_abs_diff"}
