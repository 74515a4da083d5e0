"""normlib with PyTorch's tools: double backward, torch.func, torch.jit.trace, and the edge cases
models meet (zero-width rows, NumPy integer sizes, old state_dicts).

Every answer is compared with the torch twin's: a fused backend may be slower or refuse, but never
return a different gradient or an uninitialized tensor without an error.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import normlib

CPU = torch.device("cpu")
WIDTH = 8


def _dtype(backend: str) -> torch.dtype:
    """float64 where the backend computes it; the Triton kernels compute in float32."""
    return torch.float32 if backend == "triton" else torch.float64


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}


# Each op as (inputs, parameters) -> outputs, so one test drives all four.
OPS = {
    "rms_norm": lambda x, r, w, b, backend: (normlib.rms_norm(x, WIDTH, w, 1e-5, backend=backend),),
    "add_rms_norm": lambda x, r, w, b, backend: normlib.add_rms_norm(x, r, WIDTH, w, 1e-5, backend=backend),
    "layer_norm": lambda x, r, w, b, backend: (normlib.layer_norm(x, WIDTH, w, b, 1e-5, backend=backend),),
    "add_layer_norm": lambda x, r, w, b, backend: normlib.add_layer_norm(x, r, WIDTH, w, b, 1e-5, backend=backend),
}
FUSED_CASES = [
    (op, backend) for op in OPS for backend in normlib.available_backends(op, CPU) if backend != "torch"
]


def _tensors(dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x, r = (torch.randn(2, 3, WIDTH, generator=generator, dtype=dtype) for _ in range(2))
    w = torch.rand(WIDTH, generator=generator, dtype=dtype) + 0.5
    b = torch.randn(WIDTH, generator=generator, dtype=dtype)
    return [t.requires_grad_() for t in (x, r, w, b)]


def _loss(outputs) -> torch.Tensor:
    """A loss that weighs every element differently, so no symmetry hides a wrong gradient."""
    return sum((o * torch.linspace(-1, 2, o.numel(), dtype=o.dtype).view_as(o)).sin().sum() for o in outputs)


def _penalized_gradients(op: str, backend: str, dtype: torch.dtype):
    """The gradients of loss + ||d loss / d(x, w)||^2 (a gradient penalty, as in WGAN-GP)."""
    tensors = _tensors(dtype)
    loss = _loss(OPS[op](*tensors, backend))
    first = torch.autograd.grad(loss, [tensors[0], tensors[2]], create_graph=True)
    penalty = sum(g.pow(2).sum() for g in first)
    return torch.autograd.grad(loss + penalty, tensors, allow_unused=True)


@pytest.mark.parametrize(("op", "backend"), FUSED_CASES)
def test_gradient_penalty_matches_torch(op, backend):
    """Double backward: the first gradient is itself differentiated (the penalty's share reaches
    x.grad and w.grad), as through torch's ops."""
    dtype = _dtype(backend)
    ours = _penalized_gradients(op, backend, dtype)
    theirs = _penalized_gradients(op, "torch", dtype)
    for mine, torchs in zip(ours, theirs):
        if torchs is None:
            assert mine is None
        else:
            torch.testing.assert_close(mine, torchs, **_tolerance(dtype))


@pytest.mark.parametrize(
    ("op", "backend", "which"),
    [
        (op, backend, which)
        for op, backend in FUSED_CASES
        for which in ("weight only", "input only") + (("h only",) if op.startswith("add_") else ())
    ],
)
def test_double_backward_with_part_of_the_graph_matches_torch(op, backend, which):
    """Double backward when only the weight or only the input requires grad, or when a fused op's
    normalized output is not used at all (only h is)."""
    dtype = _dtype(backend)
    results = []
    for name in (backend, "torch"):
        x, r, w, b = _tensors(dtype)
        if which == "weight only":
            x, r = x.detach(), r.detach()
        elif which == "input only":
            w, b = w.detach(), b.detach()
        outputs = OPS[op](x, r, w, b, name)
        if which == "h only":
            outputs = outputs[1:]
        loss = _loss(outputs)
        leaves = [t for t in (x, r, w, b) if t.requires_grad]
        first = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        penalty = sum(g.pow(2).sum() for g in first if g is not None and g.requires_grad)
        results.append(torch.autograd.grad(loss + penalty, leaves, allow_unused=True))
    for mine, torchs in zip(*results):
        if torchs is None:
            assert mine is None or not mine.any()
        else:
            torch.testing.assert_close(mine, torchs, **_tolerance(dtype))


@pytest.mark.parametrize("backend", normlib.available_backends("rms_norm", CPU))
def test_rms_norm_module_double_backward_matches_torch_rmsnorm(backend):
    dtype = _dtype(backend)
    ours = normlib.RMSNorm(WIDTH, eps=1e-6, backend=backend).to(dtype)
    theirs = nn.RMSNorm(WIDTH, eps=1e-6).to(dtype)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    x_ours = torch.randn(4, WIDTH, dtype=dtype, generator=torch.Generator().manual_seed(1)).requires_grad_()
    x_theirs = x_ours.detach().clone().requires_grad_()
    for module, x in ((ours, x_ours), (theirs, x_theirs)):
        (dx,) = torch.autograd.grad(module(x).tanh().sum(), x, create_graph=True)
        (module(x).sum() + dx.pow(2).sum()).backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, **_tolerance(dtype))
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **_tolerance(dtype))


@pytest.mark.parametrize(("op", "backend"), FUSED_CASES)
def test_hessian_vector_product_matches_torch(op, backend):
    """Differentiating a gradient again: a Hessian-vector product through the op."""
    dtype = _dtype(backend)
    results = []
    for name in (backend, "torch"):
        x, r, w, b = _tensors(dtype)
        (dx,) = torch.autograd.grad(_loss(OPS[op](x, r, w, b, name)), x, create_graph=True)
        vector = torch.linspace(-1, 1, dx.numel(), dtype=dtype).view_as(dx)
        results.append(torch.autograd.grad((dx * vector).sum(), [x, w]))
    for mine, torchs in zip(*results):
        torch.testing.assert_close(mine, torchs, **_tolerance(dtype))


# ----------------------------------------------------------------------------------------------
# torch.func
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "backend"), FUSED_CASES)
def test_torch_func_transforms_match_torch(op, backend):
    """grad, jacrev, vmap and vmap(grad) give the torch backend's answers."""
    dtype = _dtype(backend)
    x, r, w, b = (t.detach() for t in _tensors(dtype))

    def scalar(name):
        return lambda x_, r_, w_: _loss(OPS[op](x_, r_, w_, b, name))

    def batched(name):
        return lambda x_, r_: OPS[op](x_, r_, w, b, name)

    for transform in (
        lambda f: grad(f, argnums=(0, 2))(x, r, w),
        lambda f: jacrev(f, argnums=0)(x[0, 0], r[0, 0], w),
        lambda f: vmap(grad(f, argnums=(0, 2)), in_dims=(0, 0, None))(x, r, w),
    ):
        torch.testing.assert_close(transform(scalar(backend)), transform(scalar("torch")), **_tolerance(dtype))
    torch.testing.assert_close(vmap(batched(backend))(x, r), vmap(batched("torch"))(x, r), **_tolerance(dtype))


@pytest.mark.parametrize("backend", normlib.available_backends("rms_norm", CPU))
def test_per_sample_gradients_of_rmsnorm_module(backend):
    """The per-sample-gradient recipe of torch.func's docs, on normlib.RMSNorm and nn.RMSNorm."""
    dtype = _dtype(backend)
    ours, theirs = normlib.RMSNorm(WIDTH, backend=backend).to(dtype), nn.RMSNorm(WIDTH).to(dtype)
    x = torch.randn(5, WIDTH, dtype=dtype, generator=torch.Generator().manual_seed(2))

    def per_sample(module):
        params = {name: p.detach() for name, p in module.named_parameters()}

        def loss(params, sample):
            return functional_call(module, params, (sample.unsqueeze(0),)).sin().sum()

        return vmap(grad(loss), in_dims=(None, 0))(params, x)["weight"]

    torch.testing.assert_close(per_sample(ours), per_sample(theirs), **_tolerance(dtype))


# ----------------------------------------------------------------------------------------------
# torch.jit.trace
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad_enabled", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize(
    ("module_name", "backend"),
    [(m, b) for m, op in (("RMSNorm", "rms_norm"), ("LayerNorm", "layer_norm")) for b in normlib.available_backends(op, CPU)],
)
def test_jit_trace_records_what_torch_computes(module_name, backend, grad_enabled):
    """The traced module replays the norm on a new input (not the trace-time output, not an
    uninitialized buffer), with or without autograd while tracing. float32, where the C kernels
    run (the tracer cannot see inside them)."""
    dtype = torch.float32
    module = getattr(normlib, module_name)(64, backend=backend).to(dtype)
    twin = getattr(nn, module_name)(64).to(dtype)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        twin.weight.copy_(module.weight)
    example = torch.randn(2, 64, dtype=dtype)
    with torch.set_grad_enabled(grad_enabled), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the argument checks' Python bools
        traced = torch.jit.trace(module, example)
    fresh = torch.randn(5, 64, dtype=dtype, generator=torch.Generator().manual_seed(3)) * 3 + 1
    with torch.no_grad():
        torch.testing.assert_close(traced(fresh), twin(fresh), **_tolerance(dtype))


SCRIPT_CASES = {
    "LayerNorm": ((6,), (3, 4, 6)),
    "RMSNorm": ((6,), (3, 4, 6)),
    "GroupNorm": ((2, 6), (3, 6, 5)),
    "BatchNorm1d": ((6,), (4, 6, 5)),
    "BatchNorm2d": ((6,), (4, 6, 3, 2)),
    "BatchNorm3d": ((6,), (4, 6, 3, 2, 2)),
    "InstanceNorm1d": ((6,), (4, 6, 5)),
    "InstanceNorm2d": ((6,), (4, 6, 3, 2)),
    "InstanceNorm3d": ((6,), (4, 6, 3, 2, 2)),
}


@pytest.mark.parametrize("name", list(SCRIPT_CASES))
def test_jit_script_compiles_the_torch_twin_with_the_same_state(name):
    """torch.jit.script cannot compile normlib's dispatch; it compiles the torch.nn twin holding the
    module's own parameters and buffers, so the scripted model computes what the module does,
    in train and eval mode, and its training updates the module's running statistics."""
    args, shape = SCRIPT_CASES[name]
    extra = {"affine": True, "track_running_stats": True} if name.startswith("InstanceNorm") else {}
    module = getattr(normlib, name)(*args, **extra)
    with torch.no_grad():
        for tensor in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            tensor.uniform_(0.5, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in favour of torch.compile
        scripted = torch.jit.script(module)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    for training in (True, False):
        module.train(training)
        scripted.train(training)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        expected = module(x)
        after_eager = {k: v.clone() for k, v in module.state_dict().items()}
        module.load_state_dict(before)
        torch.testing.assert_close(scripted(x), expected)
        for key, value in module.state_dict().items():  # the scripted model moved the module's own buffers
            torch.testing.assert_close(value, after_eager[key], msg=key)


@pytest.mark.parametrize(
    "make",
    [
        lambda: normlib.RMSNorm(6, offset=1.0, casting="gemma"),
        lambda: normlib.LayerNorm2d(6),
        lambda: normlib.SyncBatchNorm(6),
    ],
    ids=["RMSNorm-gemma", "LayerNorm2d", "SyncBatchNorm"],
)
def test_jit_script_refuses_clearly_where_there_is_no_scriptable_twin(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(RuntimeError, match="torch.jit.script cannot compile .*use torch.jit.trace or torch.compile"):
            torch.jit.script(make())


# ----------------------------------------------------------------------------------------------
# Edge cases of shapes, sizes and state
# ----------------------------------------------------------------------------------------------

EMPTY_CASES = [
    (op, backend, shape)
    for op in OPS
    for backend in normlib.available_backends(op, CPU)
    for shape in ((3, 0), (0, 4), (0, 0))
]


@pytest.mark.parametrize(("op", "backend", "shape"), EMPTY_CASES)
def test_empty_inputs_return_what_torch_returns(op, backend, shape):
    """Zero-width rows (normalized_shape 0) and zero rows give torch's empty results, forward and
    backward, on every backend."""
    dtype = _dtype(backend)
    width = shape[-1]
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    r = torch.randn(shape, dtype=dtype)
    w = torch.ones(width, dtype=dtype, requires_grad=True)
    b = torch.zeros(width, dtype=dtype, requires_grad=True)
    call = {
        "rms_norm": lambda be: (normlib.rms_norm(x, width, w, backend=be),),
        "add_rms_norm": lambda be: normlib.add_rms_norm(x, r, width, w, backend=be),
        "layer_norm": lambda be: (normlib.layer_norm(x, width, w, b, backend=be),),
        "add_layer_norm": lambda be: normlib.add_layer_norm(x, r, width, w, b, backend=be),
    }[op]
    ours, theirs = call(backend), call("torch")
    for mine, torchs in zip(ours, theirs):
        assert mine.shape == torchs.shape == shape and mine.dtype == torchs.dtype
    grads = torch.autograd.grad(ours[0].sum(), [x, w])
    assert grads[0].shape == shape and grads[1].shape == (width,)
    assert not grads[1].any()  # no rows: the weight's gradient is an empty sum


def test_numpy_integer_sizes_are_accepted_as_torch_accepts_them():
    size = np.int64(4)
    cases = [
        (normlib.LayerNorm(size), nn.LayerNorm(size)),
        (normlib.RMSNorm(size), nn.RMSNorm(size)),
        (normlib.GroupNorm(np.int64(2), np.int64(6)), nn.GroupNorm(np.int64(2), np.int64(6))),
        (normlib.BatchNorm1d(size), nn.BatchNorm1d(size)),
        (normlib.InstanceNorm1d(size, affine=True), nn.InstanceNorm1d(size, affine=True)),
    ]
    for ours, theirs in cases:
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
            k: tuple(v.shape) for k, v in theirs.state_dict().items()
        }
        ours.load_state_dict(theirs.state_dict(), strict=True)
    assert normlib.LayerNorm(size).normalized_shape == (4,) and type(normlib.LayerNorm(size).normalized_shape[0]) is int
    assert type(normlib.GroupNorm(np.int64(2), 6).num_groups) is int
    x = torch.randn(3, 6, 4)
    torch.testing.assert_close(normlib.layer_norm(x, np.int64(4)), F.layer_norm(x, (4,)))
    torch.testing.assert_close(normlib.group_norm(x, np.int64(3)), F.group_norm(x, 3))
    with pytest.raises(TypeError, match="num_groups must be an int"):
        normlib.GroupNorm(2.5, 6)


@pytest.mark.parametrize("cls_name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"])
def test_old_batch_norm_state_dict_without_num_batches_tracked_loads_strictly(cls_name):
    """A state_dict saved before torch added num_batches_tracked (version 1) loads with
    strict=True, as into torch's own BatchNorm, which keeps its counter."""
    theirs_cls = getattr(nn, cls_name)
    old = theirs_cls(3).state_dict()
    old["running_mean"].fill_(0.25)
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    ours, theirs = getattr(normlib, cls_name)(3), theirs_cls(3)
    ours.num_batches_tracked.fill_(5)
    theirs.num_batches_tracked.fill_(5)
    assert str(theirs.load_state_dict(old, strict=True)) == str(ours.load_state_dict(old, strict=True))
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 5
    assert torch.equal(ours.running_mean, theirs.running_mean)
    # version 2 (the current one) still requires the key, as in torch
    current = theirs_cls(3).state_dict()
    del current["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        getattr(normlib, cls_name)(3).load_state_dict(current, strict=True)
