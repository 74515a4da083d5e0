"""Other libraries' fused norms, timed beside normlib's: Liger-Kernel (Hsu et al., 2024).

Liger-Kernel is optional: where it is not installed, or was brought along only as a wheel file
(:func:`use_wheel`), its implementations are left out and :func:`liger_unavailable_reason` says why.
"""

from __future__ import annotations

import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Optional

from normlib.bench.cases import LAYER_NORM_EPS, LIGER

# Liger's RMSNorm with the conventions of F.rms_norm: no offset on the weight, statistics and
# scaling in float32 ("llama" casting), and dx written to a new tensor (in_place=False), because the
# benchmark reuses the upstream gradient dy for every implementation.
LIGER_RMS_NORM_OPTIONS = dict(offset=0.0, casting_mode="llama", in_place=False)
RMS_NORM_EPS = 1.1920928955078125e-07  # torch.finfo(torch.float32).eps, what eps=None means in torch


def use_wheel(wheel: Path) -> Path:
    """Make the packages of ``wheel`` (a .whl file) importable without installing anything: its
    files are unpacked into a temporary folder appended to ``sys.path``. Returns that folder."""
    wheel = Path(wheel)
    if not wheel.is_file() or wheel.suffix != ".whl":
        raise ValueError(f"--liger-wheel must be an existing .whl file, got {str(wheel)!r}")
    folder = Path(tempfile.mkdtemp(prefix="normlib-wheel-"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(folder)
    sys.path.append(str(folder))
    return folder


def liger_unavailable_reason() -> Optional[str]:
    """None when Liger-Kernel's norm functions can be imported, else why not."""
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction  # noqa: F401
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction  # noqa: F401
    except Exception as error:  # ImportError, or an incompatible triton raising at import
        return (f"Liger-Kernel cannot be imported ({type(error).__name__}: {error}); install liger-kernel "
                f"or pass its wheel with --liger-wheel")
    return None


def liger_implementations(op: str) -> dict[str, Callable]:
    """label -> Liger's function for ``op``, taking the benchmark's arguments (see
    :func:`normlib.bench.cases.op_inputs`); empty where Liger is unavailable or lacks the op."""
    if liger_unavailable_reason() is not None:
        return {}
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    options = LIGER_RMS_NORM_OPTIONS
    rms = lambda x, w: LigerRMSNormFunction.apply(  # noqa: E731
        x, w, RMS_NORM_EPS, options["offset"], options["casting_mode"], options["in_place"])
    if op == "layer_norm":
        return {LIGER: lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, LAYER_NORM_EPS)}
    if op == "rms_norm":
        return {LIGER: rms}
    if op == "add_rms_norm":
        try:  # a fused residual add, in Liger releases that have one
            from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
        except ImportError:
            return {}
        return {LIGER: lambda x, r, w: LigerFusedAddRMSNormFunction.apply(
            x, r, w, RMS_NORM_EPS, options["offset"], options["casting_mode"], options["in_place"])}
    return {}
