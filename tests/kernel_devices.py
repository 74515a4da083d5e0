"""Where the tests run the Triton kernels: compiled on a CUDA device where one exists, else under
Triton's interpreter on CPU tensors.

Triton decides between compiler and interpreter when a kernel is *defined* (``@triton.jit``
reads ``TRITON_INTERPRET`` then), that is when ``normlib.kernels`` is first imported. So the
variable is set, or not, once for the whole test session, before any test imports triton:
``tests/conftest.py`` calls :func:`configure_triton` at collection time.
"""

from __future__ import annotations

import os
from typing import MutableMapping, Optional

import torch

INTERPRET = "TRITON_INTERPRET"


def kernel_device(cuda_available: Optional[bool] = None) -> torch.device:
    """The device of the tensors given to the Triton kernels: CUDA where it exists (the kernels
    run compiled there), else the CPU (the kernels run in the interpreter)."""
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    return torch.device("cuda") if cuda_available else torch.device("cpu")


def configure_triton(environ: MutableMapping[str, str] = os.environ, cuda_available: Optional[bool] = None) -> bool:
    """Switch the interpreter on (``TRITON_INTERPRET=1``) only where no CUDA device exists; an
    explicit setting in ``environ`` wins. Returns whether the kernels will be interpreted."""
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not cuda_available:
        environ.setdefault(INTERPRET, "1")
    return environ.get(INTERPRET, "0") == "1"


def pretend_kernels_compiled_for_the_gpu(monkeypatch) -> None:
    """As on a machine whose Triton kernels were defined for the GPU: CPU tensors cannot run them.

    Whether they can is fixed when normlib's kernels are first imported
    (``normlib.kernels._rows.INTERPRETED``), so the test sets that flag, not only the environment.
    """
    import sys

    from normlib import backends

    monkeypatch.setenv(INTERPRET, "0")
    monkeypatch.setattr(backends, "_CANDIDATES", {})
    if "normlib.kernels._rows" in sys.modules:
        monkeypatch.setattr(sys.modules["normlib.kernels._rows"], "INTERPRETED", False)
