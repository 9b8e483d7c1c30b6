"""torch as an optional dependency: look at torch objects only when the caller already imported torch.

The converter and the command-line tools never import torch (it takes seconds and much memory to
load), yet `write_dataset` and `CaffeTransform` accept torch tensors and datasets. A tensor, a
torch Dataset or a DataLoader worker can only exist once torch was imported, so checking whether
`torch` is already in `sys.modules` answers "is this a torch object?" without importing it.
"""

from __future__ import annotations

import sys
from typing import Any


def torch_if_imported() -> Any:
    """The torch module if this process has imported it, else None (nothing torch-made can exist then)."""
    return sys.modules.get("torch")
