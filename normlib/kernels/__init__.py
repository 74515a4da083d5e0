"""Fused Triton kernels for LayerNorm and RMSNorm (forward and backward, with an optional residual
add in front) and for Dynamic Tanh.

Nothing here is imported by ``import normlib``: :mod:`normlib.backends` loads an entry file
(``layer_norm``, ``rms_norm`` or ``dyt``) the first time an op runs with the ``"triton"`` backend,
so machines without triton never import it.

=================  ==========================================================================
file               what it holds
=================  ==========================================================================
row_norm.py        the one forward and one backward kernel of both norms (``IS_RMS`` drops the
                   mean, the shift and the bias), their wrappers and the shared autograd glue
layer_norm.py      LayerNorm's entry points: the custom ops and ``layer_norm_triton``,
                   ``add_layer_norm_triton``
rms_norm.py        RMSNorm's entry points, the same with ``IS_RMS=True``
dyt.py             Dynamic Tanh: an element-wise kernel, with the same deterministic reductions
_rows.py           what all of them share: the (rows, width) view of a tensor, block and grid sizes,
                   and the deterministic second-stage sum of the per-program weight gradients
compile_check.py   ``python -m normlib.kernels.compile_check``: compiles every kernel variant for a
                   GPU architecture without a GPU (catches what the CPU interpreter cannot)
=================  ==========================================================================
"""
