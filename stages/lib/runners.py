"""Model runners: load a saved model of any kind and map uint8 NHWC images to class scores.

Frameworks are imported only by the runner that needs them: TensorFlow and torch must never
share a process (importing torch after TensorFlow and onnxruntime has crashed).
The model input is raw pixels 0-255 as float32 NHWC, no normalisation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import PipelineError

Predict = Callable[[np.ndarray], np.ndarray]

# PyTorch's integer kernels for uint8 models: QNNPACK. fbgemm ("x86") and oneDNN multiply uint8
# activations by int8 weights with vpmaddubsw on CPUs without VNNI (AVX2 only), whose 16-bit sums
# saturate for full-range activations: measured on an emulated AVX2 CPU (QEMU), torch_uint8 fell
# from 0.8775 to 0.846 on 2,000 test images with fbgemm and from 0.879 to 0.739 on 1,000 with
# oneDNN. QNNPACK accumulates in int32 on every x86 CPU and gave the same labels on both.
TORCH_ENGINE = "qnnpack"


def to_model_input(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, dtype=np.float32)


def batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), batch_size):
        yield to_model_input(images[start:start + batch_size])


def _require(path: Path) -> Path:
    if not path.is_file():
        raise PipelineError(f"{path}: model file not found")
    return path


def keras_model(path: Path):
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    try:
        return keras.models.load_model(_require(path), compile=False)
    except (OSError, ValueError, TypeError) as exc:
        raise PipelineError(f"{path}: not a loadable Keras model ({' '.join(str(exc).split())[:200]})") from None


def keras_runner(path: Path) -> Predict:
    import warnings

    model = keras_model(path)

    def predict(x: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Keras 3 on a legacy .h5's input name
            return np.asarray(model(x, training=False), dtype=np.float32)

    return predict


def onnx_session_options(optimized_model: Path | None = None):
    """ONNX Runtime's CPU session options for every model here. `session.qdqisint8allowed`: on x86,
    ONNX Runtime otherwise keeps int8 (S8) activations out of its integer kernels: it rewrites them
    to uint8 where a quantize node has one consumer and runs the rest as float between Q/DQ nodes
    (3 of 9 Conv in QLinearConv for ResNet8). With it, every int8 Conv / Add / Gemm runs as an
    integer kernel, whose int32 accumulation is exact on every x86 CPU kind (no uint8 x int8
    16-bit saturation as on AVX2 without VNNI)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdqisint8allowed", "1")
    if optimized_model is not None:
        options.optimized_model_filepath = str(optimized_model)
    return options


def onnx_session(path: Path, optimized_model: Path | None = None):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(_require(path)), onnx_session_options(optimized_model),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise PipelineError(f"{path}: onnxruntime cannot load it ({' '.join(str(exc).split())[:200]})") from None


def onnx_runner(path: Path) -> Predict:
    session = onnx_session(path)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0].astype(np.float32)


def torch_load(path: Path):
    """Load a TorchScript archive written by torch_save (no ONNX file or onnx2torch needed)."""
    import warnings

    import torch

    torch.backends.quantized.engine = TORCH_ENGINE  # quantized weights are packed for it while loading
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still the
            # one format that saves onnx2torch graphs and quantized FX models alike
            model = torch.jit.load(str(_require(path)), map_location="cpu")
    except RuntimeError as exc:
        raise PipelineError(f"{path}: not a loadable TorchScript model ({str(exc).splitlines()[0]})") from None
    return model.eval()


def torch_runner(path: Path) -> Predict:
    import torch

    model = torch_load(path)

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy().astype(np.float32)

    return predict


def tflite_interpreter(path: Path):
    import os
    import warnings

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter is deprecated in favour of LiteRT
            interpreter = tf.lite.Interpreter(model_path=str(_require(path)))
    except ValueError as exc:
        raise PipelineError(f"{path}: not a loadable TFLite model ({' '.join(str(exc).split())[:200]})") from None
    interpreter.allocate_tensors()
    return interpreter


def tflite_runner(path: Path) -> Predict:
    """A TFLite model, integer input/output included: float pixels are quantized with the
    model's own input parameters (MLPerf's int8 model: scale 1, zero point -128, i.e.
    pixel - 128) and integer outputs dequantized with its output parameters."""
    interpreter = tflite_interpreter(path)
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def predict(x: np.ndarray) -> np.ndarray:
        interpreter.resize_tensor_input(source["index"], list(x.shape))
        interpreter.allocate_tensors()
        scale, zero_point = source["quantization"]
        if np.issubdtype(source["dtype"], np.integer):
            info = np.iinfo(source["dtype"])
            x = np.clip(np.round(x / scale + zero_point), info.min, info.max)
        interpreter.set_tensor(source["index"], x.astype(source["dtype"]))
        interpreter.invoke()
        y = interpreter.get_tensor(target["index"])
        scale, zero_point = target["quantization"]
        if np.issubdtype(target["dtype"], np.integer):
            y = (y.astype(np.float32) - zero_point) * scale
        return y.astype(np.float32)

    return predict


RUNNERS: dict[str, Callable[[Path], Predict]] = {
    "keras": keras_runner,
    "tflite": tflite_runner,
    "onnx": onnx_runner,
    "torch": torch_runner,
}


def load_runner(kind: str, path: str | Path) -> Predict:
    if kind not in RUNNERS:
        raise PipelineError(f"unknown model kind '{kind}'; known: {', '.join(RUNNERS)}")
    return RUNNERS[kind](Path(path))


def predict_all(predict: Predict, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([predict(batch) for batch in batches(images, batch_size)])
