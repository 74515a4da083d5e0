"""Shared test configuration.

The Triton kernels are tested on the CPU through Triton's interpreter, which must be switched on
before triton is first imported; setting it here, at collection time, does that for every test.
A GPU run can opt out with TRITON_INTERPRET=0.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
