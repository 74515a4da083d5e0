"""normlib: the normalization layers of the course, readable and fast.

Each norm lives in one file that holds, in reading order, its NumPy reference (the math in the
docstring), its functional op on torch tensors (same signature as ``torch.nn.functional``, plus a
keyword-only ``backend``) and its ``nn.Module`` (a drop-in for the ``torch.nn`` twin):

=================  ==========================================================================
file               what it holds
=================  ==========================================================================
batch_norm.py      ``batch_norm``, ``BatchNorm1d``, ``BatchNorm2d``
layer_norm.py      ``layer_norm``, ``add_layer_norm``, ``LayerNorm``, ``LayerNorm2d``
rms_norm.py        ``rms_norm``, ``add_rms_norm``, ``RMSNorm``
group_norm.py      ``group_norm``, ``GroupNorm``
instance_norm.py   ``instance_norm``, ``InstanceNorm1d``, ``InstanceNorm2d``
backends.py        which implementation runs: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"``
cpu.py             the fused CPU path
kernels/           the Triton kernels, imported only when used
distributed.py     BatchNorm with statistics synchronized across processes
bench.py           the benchmark: ``python -m normlib.bench``
book/              data, models, training loops and plots shared by the notebooks
=================  ==========================================================================
"""

from normlib.backends import available_backends
from normlib.batch_norm import BatchNorm1d, BatchNorm2d, batch_norm
from normlib.group_norm import GroupNorm, group_norm
from normlib.instance_norm import InstanceNorm1d, InstanceNorm2d, instance_norm
from normlib.layer_norm import LayerNorm, LayerNorm2d, add_layer_norm, layer_norm
from normlib.rms_norm import RMSNorm, add_rms_norm, rms_norm
from normlib.distributed import SyncBatchNorm, convert_sync_batchnorm

__version__ = "0.2.0"  # the one place the version is written (pyproject.toml reads it)

__all__ = [
    "available_backends",
    "batch_norm",
    "BatchNorm1d",
    "BatchNorm2d",
    "layer_norm",
    "add_layer_norm",
    "LayerNorm",
    "LayerNorm2d",
    "rms_norm",
    "add_rms_norm",
    "RMSNorm",
    "group_norm",
    "GroupNorm",
    "instance_norm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
]
