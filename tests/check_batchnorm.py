"""Compare the BatchNorm constants in a converted ONNX model with the exact ones computed from
the Keras model's weights (float64, rounded once to float32):

    python -m tests.check_batchnorm KERAS.h5 MODEL.onnx

Prints how many Keras BatchNormalization layers there are and how many (scale, shift) pairs the
ONNX graph holds bit for bit.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from stages.convert_onnx import keras_batchnorms
from stages.lib import runners

if __name__ == "__main__":
    exact = keras_batchnorms(runners.keras_model(Path(sys.argv[1])))
    values = [numpy_helper.to_array(t).ravel() for t in onnx.load(sys.argv[2]).graph.initializer]

    def present(array: np.ndarray) -> bool:
        return any(v.dtype == array.dtype and np.array_equal(v, array) for v in values)

    print(json.dumps({"batchnorms": len(exact), "exact": sum(present(s) and present(t) for s, t in exact)}))
