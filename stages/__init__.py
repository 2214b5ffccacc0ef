"""Stage code of the ResNet8 quantization pipeline; each module is one DVC stage.

Importing the package applies the thread budget (lib/threads.py) before any framework loads, and
has freed memory kept for reuse rather than unmapped (lib/allocator.py)."""
import sys as _sys

from .lib import allocator as _allocator
from .lib import threads as _threads

_allocator.keep_freed_memory()

try:
    _threads.apply()
except _threads.BudgetError as _exc:
    _sys.exit(f"error: {_exc}")
