"""PyTorch models from ONNX (onnx2torch) and their persistence as TorchScript archives.

A pickled onnx2torch GraphModule is reported not to reload in a fresh process, so every torch
model here is traced and saved with torch.jit: the archive loads with torch alone
(runners.torch_load) and gives outputs identical to the module it was traced from.
"""
from __future__ import annotations

import hashlib
import io
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import PipelineError

TRACE_BATCH = 4
ALIGNMENT = 64  # torch.serialization aligns every record's data to 64 bytes
SERIALIZATION_ID = ".data/serialization_id"


def from_onnx(path: Path) -> torch.fx.GraphModule:
    import onnx
    from onnx2torch import convert

    try:
        graph = onnx.load(str(path))
    except FileNotFoundError:
        raise PipelineError(f"{path}: ONNX model not found") from None
    except Exception as exc:  # protobuf's DecodeError and friends
        raise PipelineError(f"{path}: not a readable ONNX model ({' '.join(str(exc).split())[:200]})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(graph).eval()


def portable_archive(archive: bytes) -> bytes:
    """The TorchScript archive without what ties it to this checkout, so the same model gives the
    same bytes (and dvc.lock hashes) in every clone. torch.jit.save adds, next to each code file, a
    .debug_pkl of source locations holding absolute paths into the virtualenv (used only in error
    messages), and a serialization id that changes with them. Copy the records in order, same
    compression, data kept 64-byte aligned as torch writes it, without the .debug_pkl records and
    with the id hashed from what is kept."""
    source = zipfile.ZipFile(io.BytesIO(archive))
    records = [(info, source.read(info)) for info in source.infolist() if not info.filename.endswith(".debug_pkl")]
    kept = hashlib.sha256(b"".join(info.filename.encode() + data for info, data in records
                                   if not info.filename.endswith(SERIALIZATION_ID)))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info, data in records:
            if info.filename.endswith(SERIALIZATION_ID):
                data = str(int(kept.hexdigest()[:32], 16)).zfill(40)[-40:].encode()
            record = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            record.compress_type, record.external_attr = info.compress_type, info.external_attr
            data_offset = out.tell() + 30 + len(info.filename.encode()) + 4  # local header + pad header
            padding = -data_offset % ALIGNMENT
            record.extra = struct.pack("<HH", 0x4246, padding) + b"Z" * padding  # torch's own padding field
            target.writestr(record, data)
    return out.getvalue()


def save_torchscript(model: torch.nn.Module, path: Path, example: np.ndarray) -> None:
    """Trace `model` on `example` (float32 NHWC) and save; checked on another batch size."""
    from .runners import torch_load

    inputs = torch.from_numpy(np.asarray(example[:TRACE_BATCH], dtype=np.float32))
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, inputs, check_trace=False)
        buffer = io.BytesIO()  # not the file: its (temporary) name would go into the archive
        torch.jit.save(traced, buffer)
    path.write_bytes(portable_archive(buffer.getvalue()))
    check = torch.from_numpy(np.asarray(example, dtype=np.float32))
    with torch.inference_mode():
        expected, reloaded = model(check), torch_load(path)(check)
    if not torch.equal(expected, reloaded):
        raise PipelineError(f"{path}: the saved TorchScript model does not reproduce the in-memory "
                            f"model (max |diff| {float((expected - reloaded).abs().max()):.3g})")
