"""normlib: the normalization layers of the course, readable and fast.

Each norm lives in one file that holds, in reading order, its NumPy reference (the math in the
docstring), its functional op on torch tensors (same signature as ``torch.nn.functional``, plus a
keyword-only ``backend``) and its ``nn.Module`` (a drop-in for the ``torch.nn`` twin):

=================  ==========================================================================
file               what it holds
=================  ==========================================================================
batch_norm.py      ``batch_norm``, ``BatchNorm1d/2d/3d``, ``LazyBatchNorm1d/2d/3d``
batch_renorm.py    ``batch_renorm``, ``BatchRenorm2d`` (Batch Renormalization, for small batches)
conditional.py     ``film``, ``FiLM``, ``ConditionalBatchNorm2d``, ``AdaLNZeroBlock`` (conditional norms)
layer_norm.py      ``layer_norm``, ``add_layer_norm``, ``LayerNorm``, ``LayerNorm2d``
rms_norm.py        ``rms_norm``, ``add_rms_norm``, ``RMSNorm``
qk_norm.py         ``qk_norm``, ``QKNorm`` (LayerNorm or RMSNorm on attention's queries and keys)
dyt.py             ``dyt``, ``DyT`` (Dynamic Tanh, an element-wise stand-in for a norm)
norm_free.py       ``ScaledWSConv2d``, ``adaptive_grad_clip``, ``SkipInit`` (training without norms)
group_norm.py      ``group_norm``, ``GroupNorm``
instance_norm.py   ``instance_norm``, ``InstanceNorm1d``, ``InstanceNorm2d``, ``InstanceNorm3d``
backends.py        which implementation runs (``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"``), and
                   ``explain_dispatch``, which says why
cpu/               the fused CPU path: C kernels, and blocked PyTorch where they cannot run
kernels/           the Triton kernels, imported only when used
distributed.py     BatchNorm with statistics synchronized across processes
convert.py         ``convert_norms``: swap the norm layers of an existing model for normlib's
bench/             the benchmark, ``python -m normlib.bench``, and the GPU check
book/              data, models, training loops and plots shared by the notebooks
=================  ==========================================================================
"""

from normlib.backends import available_backends, explain_dispatch
from normlib.batch_norm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    batch_norm,
)
from normlib.batch_renorm import BatchRenorm2d, batch_renorm
from normlib.conditional import AdaLNZeroBlock, ConditionalBatchNorm2d, FiLM, film
from normlib.group_norm import GroupNorm, group_norm
from normlib.instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, instance_norm
from normlib.layer_norm import LayerNorm, LayerNorm2d, add_layer_norm, layer_norm
from normlib.rms_norm import RMSNorm, add_rms_norm, rms_norm
from normlib.qk_norm import QKNorm, qk_norm
from normlib.dyt import DyT, dyt
from normlib.norm_free import ScaledWSConv2d, SkipInit, adaptive_grad_clip
from normlib.distributed import SyncBatchNorm, convert_sync_batchnorm
from normlib.convert import convert_norms

__version__ = "0.2.0"  # the one place the version is written (pyproject.toml reads it)

__all__ = [
    "available_backends",
    "explain_dispatch",
    "batch_norm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "batch_renorm",
    "BatchRenorm2d",
    "film",
    "FiLM",
    "ConditionalBatchNorm2d",
    "AdaLNZeroBlock",
    "layer_norm",
    "add_layer_norm",
    "LayerNorm",
    "LayerNorm2d",
    "rms_norm",
    "add_rms_norm",
    "RMSNorm",
    "qk_norm",
    "QKNorm",
    "dyt",
    "DyT",
    "ScaledWSConv2d",
    "adaptive_grad_clip",
    "SkipInit",
    "group_norm",
    "GroupNorm",
    "instance_norm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "convert_norms",
]
