"""Stage code of the ResNet8 quantization pipeline; each module is one DVC stage.

Importing the package applies the thread budget (lib/threads.py) before any framework loads."""
import sys as _sys

from .lib import threads as _threads

try:
    _threads.apply()
except _threads.BudgetError as _exc:
    _sys.exit(f"error: {_exc}")
