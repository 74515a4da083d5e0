"""Fused Triton kernels for LayerNorm and RMSNorm, forward and backward, with an optional
residual add in front.

Nothing here is imported by ``import normlib``: :mod:`normlib.backends` loads
``normlib.kernels.layer_norm`` or ``normlib.kernels.rms_norm`` the first time an op runs with the
``"triton"`` backend, so machines without triton never import it.

=================  ==========================================================================
file               what it holds
=================  ==========================================================================
layer_norm.py      LayerNorm: forward and backward kernels, their wrappers, the autograd op
rms_norm.py        RMSNorm: the same, without the mean and the bias
_rows.py           what both share: the (rows, width) view of a tensor, block and grid sizes,
                   and the deterministic second-stage sum of the per-program weight gradients
compile_check.py   ``python -m normlib.kernels.compile_check``: compiles every kernel variant for a
                   GPU architecture without a GPU (catches what the CPU interpreter cannot)
=================  ==========================================================================
"""
