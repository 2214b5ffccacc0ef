"""Model runners: load a saved model of any kind and map uint8 NHWC images to class scores.

Frameworks are imported only by the runner that needs them: TensorFlow and torch must never
share a process (importing torch after TensorFlow and onnxruntime has crashed).
The model input is raw pixels 0-255 as float32 NHWC, no normalisation.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import threads
from .errors import PipelineError

Predict = Callable[[np.ndarray], np.ndarray]

# oneDNN's int8 kernels (torch_uint8, lowered to x86 by torchao) are pinned to their AVX2 versions
# on every CPU. Without VNNI, oneDNN multiplies uint8 activations by int8 weights with vpmaddubsw,
# whose 16-bit pair sums saturate for full-range activations; with VNNI (vpdpbusd) they do not.
# The two kernel families gave different scores (max 0.07) on the same model, so results would
# depend on the CPU. Pinned, an AVX-512/VNNI CPU runs the same kernels as an AVX2-only one and
# the scores are the same (checked under QEMU's emulated AVX2 CPU). oneDNN reads this once, at
# its first use in the process.
ONEDNN_ISA = "AVX2"
EXECUTORCH_BATCH = 100  # ExecuTorch programs are planned for one batch size; the runner pads to it


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
    options.intra_op_num_threads = threads.budget()  # the stage's share of the CPUs (lib/threads.py)
    options.inter_op_num_threads = 1
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


def pin_onednn_isa() -> None:
    import os

    os.environ["ONEDNN_MAX_CPU_ISA"] = ONEDNN_ISA


def exported_module(path: Path):
    """A program saved with torch.export.save, as a callable module. Quantized programs need
    torchao's quantize / dequantize operators registered first."""
    import io
    import logging

    import torch
    import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401  (registers quantized_decomposed ops)

    data = _require(path).read_bytes()  # a buffer: torch.export.load wants a name ending in .pt2
    quiet = logging.getLogger("torch.export")  # it logs a traceback for a damaged file before it raises
    level, quiet.level = quiet.level, logging.ERROR  # our one-line error names the file instead
    try:
        return torch.export.load(io.BytesIO(data)).module()
    except (RuntimeError, ValueError, KeyError, EOFError) as exc:
        raise PipelineError(f"{path}: not a loadable torch.export program ({str(exc).splitlines()[0][:200]})") from None
    except Exception as exc:  # zipfile.BadZipFile, pickle errors: torch.export raises many kinds
        raise PipelineError(f"{path}: not a loadable torch.export program ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]})") from None
    finally:
        quiet.level = level


def torch_runner(path: Path) -> Predict:
    """A float program (torch.export), run eagerly."""
    import torch

    model = exported_module(path)

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy().astype(np.float32)

    return predict


def x86_lowered(path: Path):
    """A PT2E-quantized program lowered by torchao to oneDNN's x86 integer kernels, one lowering per
    batch shape (the lowering re-exports with static shapes). Returns (predict, lower); `lower()`
    without a batch gives a lowering already made, else one for 2 images. Loaded once per process
    and file version: evaluating a model and measuring what runs share the program and its lowering."""
    stat = _require(path).stat()
    return _x86_lowered(Path(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=None)
def _x86_lowered(path: Path, _mtime_ns: int, _size: int):
    pin_onednn_isa()
    import torch
    from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401  (registers the oneDNN fusions)

    model = exported_module(path)
    lowered: dict[tuple, torch.fx.GraphModule] = {}

    def lower(x: torch.Tensor | None = None) -> torch.fx.GraphModule:
        if x is None:
            return next(iter(lowered.values())) if lowered else lower(torch.zeros(2, 32, 32, 3))
        if tuple(x.shape) not in lowered:
            with torch.no_grad():
                lowered[tuple(x.shape)] = lower_pt2e_quantized_to_x86(model, (x,))
        return lowered[tuple(x.shape)]

    def predict(x: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(x)
        with torch.no_grad():
            return lower(batch)(batch).numpy().astype(np.float32)

    return predict, lower


def torch_x86_runner(path: Path) -> Predict:
    return x86_lowered(path)[0]


def executorch_method(path: Path):
    from executorch.runtime import Runtime

    _require(path)
    try:
        return Runtime.get().load_program(str(path)).load_method("forward")
    except (RuntimeError, ValueError) as exc:
        raise PipelineError(f"{path}: not a loadable ExecuTorch program ({str(exc).splitlines()[0][:200]})") from None


def executorch_runner(path: Path) -> Predict:
    """An ExecuTorch program (.pte) through the ExecuTorch runtime, EXECUTORCH_BATCH images per call."""
    import torch

    method = executorch_method(path)

    def predict(x: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(x), EXECUTORCH_BATCH):
            chunk = x[start:start + EXECUTORCH_BATCH]
            padded = np.zeros((EXECUTORCH_BATCH, *x.shape[1:]), np.float32)
            padded[:len(chunk)] = chunk
            out.append(method.execute([torch.from_numpy(padded)])[0].numpy()[:len(chunk)])
        return np.concatenate(out).astype(np.float32)

    return predict


TORCH_QUANTIZED_FILES = {"model.pt2": "torch_x86", "model.pte": "executorch"}


def torch_quantized_model(directory: Path) -> tuple[str, Path]:
    """A quantize_torch output directory -> (kind, model file): model.pt2 is a PT2E program for the
    x86 lowering, model.pte an ExecuTorch program."""
    found = [(kind, directory / name) for name, kind in TORCH_QUANTIZED_FILES.items() if (directory / name).is_file()]
    if len(found) != 1:
        raise PipelineError(f"{directory}: expected one quantized torch model "
                            f"({' or '.join(TORCH_QUANTIZED_FILES)}), found {len(found)}")
    return found[0]


def torch_quantized_runner(path: Path) -> Predict:
    kind, model = torch_quantized_model(path)
    return RUNNERS[kind](model)


def tflite_interpreter(path: Path):
    """LiteRT's interpreter (`ai-edge-litert`), which TensorFlow deprecates its own
    `tf.lite.Interpreter` in favour of: the same runtime and XNNPACK delegate, without importing
    TensorFlow (3 s). On MLPerf's int8 model both gave the same int8 outputs, bit for bit, on all
    60,000 CIFAR-10 images (TensorFlow 2.21.0 against ai-edge-litert 2.3.0)."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_path=str(_require(path)))
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
    "torch_x86": torch_x86_runner,
    "executorch": executorch_runner,
    "torch_quantized": torch_quantized_runner,
}


def load_runner(kind: str, path: str | Path) -> Predict:
    if kind not in RUNNERS:
        raise PipelineError(f"unknown model kind '{kind}'; known: {', '.join(RUNNERS)}")
    return RUNNERS[kind](Path(path))


def predict_all(predict: Predict, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([predict(batch) for batch in batches(images, batch_size)])
