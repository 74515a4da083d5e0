"""Shared test configuration.

Where no CUDA device exists, the Triton kernels are tested on CPU tensors through Triton's
interpreter, which must be switched on before triton is first imported (``@triton.jit`` reads
``TRITON_INTERPRET`` when a kernel is defined); setting it here, at collection time, does that for
every test. Where CUDA exists it stays off and the kernels run compiled on the GPU. An explicit
``TRITON_INTERPRET`` in the environment wins. See ``tests/kernel_devices.py``.
"""

from kernel_devices import configure_triton

configure_triton()
