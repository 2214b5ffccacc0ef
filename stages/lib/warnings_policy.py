"""Which warnings a stage shows, and which are errors.

Every stage installs this policy first (errors.run_main). Two notices from the libraries are
silenced, each by its exact text, because they concern the libraries' own code, not ours:
- torch logs, when torchao is imported, that registering torchao's `KernelPreference` enum as a
  pytree constant "is deprecated" (torchao 0.18.0 does it at import; nothing on our path calls it);
- ExecuTorch's Python runtime API warns that it "is experimental" each time it is imported.

With RESNET8_STRICT_WARNINGS=1 (the tests set it for every stage they run), a DeprecationWarning
or FutureWarning raised from our code, torch, torchao, executorch or onnxruntime is an error.
Two stay allowed, named here: ExecuTorch 1.5.1 reads its own package files with
importlib.resources' legacy calls (read_text / open_text / read_binary), which Python 3.11
deprecates; that is ExecuTorch's code, run when it loads, and not a path we can change.
"""
from __future__ import annotations

import logging
import os
import warnings

STRICT_ENV = "RESNET8_STRICT_WARNINGS"
WATCHED = r"(stages|tests|torch|torchao|executorch|onnxruntime)(\.|$)"
TORCHAO_ENUM_NOTICE = "Calling register_constant() on Enum subclasses is deprecated"
EXECUTORCH_LEGACY_RESOURCES = r"(read_text|open_text|read_binary) is deprecated\. Use files\(\) instead"


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def install() -> None:
    logging.getLogger("torch.utils._pytree").addFilter(_DropMessage(TORCHAO_ENUM_NOTICE))
    if os.environ.get(STRICT_ENV) == "1":
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("error", category=category, module=WATCHED)
        warnings.filterwarnings("ignore", message=EXECUTORCH_LEGACY_RESOURCES, category=DeprecationWarning)
    # last, so that it wins: ExecuTorch's ExperimentalWarning is a DeprecationWarning subclass
    warnings.filterwarnings("ignore", message="This API is experimental")
