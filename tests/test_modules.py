"""normlib's modules as drop-ins for their torch.nn twins.

Same parameters, buffers and state_dict keys (loading works both ways), the same outputs,
gradients and running statistics over several training steps followed by evaluation, in every
dtype; plus LayerNorm2d, which has no torch twin, against ConvNeXt's formula.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from norm_cases import DTYPES, assert_close_all, randn
from torch import nn

import normlib

# id -> (constructor arguments, input shape); the class name is the same in normlib and torch.nn.
MODULE_CASES = {
    "BatchNorm1d-features": ("BatchNorm1d", (6,), {}, (8, 6)),
    "BatchNorm1d-sequence-cumulative": ("BatchNorm1d", (6,), {"momentum": None}, (4, 6, 5)),
    "BatchNorm1d-no-affine": ("BatchNorm1d", (6,), {"affine": False, "momentum": 0.3}, (4, 6, 5)),
    "BatchNorm2d": ("BatchNorm2d", (6,), {"eps": 1e-3}, (3, 6, 4, 5)),
    "BatchNorm2d-no-running-stats": ("BatchNorm2d", (6,), {"track_running_stats": False}, (3, 6, 4, 5)),
    "BatchNorm2d-no-bias": ("BatchNorm2d", (6,), {"bias": False}, (3, 6, 4, 5)),
    "LayerNorm": ("LayerNorm", (7,), {}, (3, 5, 7)),
    "LayerNorm-2d-shape-no-bias": ("LayerNorm", ((5, 7),), {"bias": False}, (3, 5, 7)),
    "LayerNorm-no-affine": ("LayerNorm", ([7],), {"elementwise_affine": False, "eps": 1e-3}, (3, 7)),
    "RMSNorm": ("RMSNorm", (7,), {}, (3, 5, 7)),
    "RMSNorm-2d-shape-eps": ("RMSNorm", ((5, 7),), {"eps": 1e-3}, (3, 5, 7)),
    "RMSNorm-no-affine": ("RMSNorm", (7,), {"elementwise_affine": False}, (3, 7)),
    "GroupNorm": ("GroupNorm", (3, 6), {}, (3, 6, 4, 5)),
    "GroupNorm-no-affine-1d": ("GroupNorm", (2, 6), {"affine": False, "eps": 1e-3}, (3, 6, 5)),
    "GroupNorm-no-bias": ("GroupNorm", (2, 6), {"bias": False}, (3, 6, 5)),
    "InstanceNorm1d": ("InstanceNorm1d", (6,), {}, (3, 6, 5)),
    "InstanceNorm1d-tracked-affine": ("InstanceNorm1d", (6,), {"affine": True, "track_running_stats": True}, (3, 6, 5)),
    "InstanceNorm1d-unbatched": ("InstanceNorm1d", (6,), {"affine": True, "track_running_stats": True}, (6, 5)),
    "InstanceNorm2d-affine": ("InstanceNorm2d", (6,), {"affine": True}, (3, 6, 4, 5)),
    "InstanceNorm2d-affine-no-bias": ("InstanceNorm2d", (6,), {"affine": True, "bias": False}, (3, 6, 4, 5)),
    "InstanceNorm2d-tracked-cumulative": ("InstanceNorm2d", (6,), {"track_running_stats": True, "momentum": None}, (3, 6, 4, 5)),
    "InstanceNorm2d-unbatched": ("InstanceNorm2d", (6,), {"track_running_stats": True, "momentum": 0.3}, (6, 4, 5)),
    "BatchNorm3d": ("BatchNorm3d", (4,), {"momentum": 0.2}, (2, 4, 3, 2, 3)),
    "BatchNorm3d-no-bias": ("BatchNorm3d", (4,), {"bias": False}, (2, 4, 3, 2, 3)),
    "InstanceNorm3d-tracked-affine": ("InstanceNorm3d", (4,), {"affine": True, "track_running_stats": True}, (2, 4, 3, 2, 3)),
    "InstanceNorm3d-unbatched": ("InstanceNorm3d", (4,), {}, (4, 3, 2, 3)),
}


def make_pair(case_id: str, **factory) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """(normlib module, torch.nn module with the same randomized state, input shape)."""
    name, args, kwargs, shape = MODULE_CASES[case_id]
    theirs = getattr(nn, name)(*args, **kwargs, **factory)
    with torch.no_grad():  # parameters and running statistics away from their initial values
        for index, tensor in enumerate(list(theirs.parameters()) + [b for b in theirs.buffers() if b.is_floating_point()]):
            tensor.copy_(randn(tensor.shape, seed=100 + index, scale=0.3).abs() + 0.5)
    ours = getattr(normlib, name)(*args, **kwargs, **factory)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, shape


def step(module: nn.Module, x: torch.Tensor, seed: int) -> list[torch.Tensor | None]:
    """One forward and backward: the output, the input's gradient and every parameter's gradient."""
    module.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_()
    y = module(leaf)
    y.backward(randn(y.shape, y.dtype, seed=seed))
    return [y.detach(), leaf.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("case_id", list(MODULE_CASES))
def test_state_dict_loads_both_ways(case_id):
    ours, theirs, _ = make_pair(case_id)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state), "state_dict keys or their order differ"
    for key, value in theirs_state.items():
        assert ours_state[key].shape == value.shape and ours_state[key].dtype == value.dtype, key
        assert torch.equal(ours_state[key], value), f"{key} was not loaded"
    fresh_torch = getattr(nn, MODULE_CASES[case_id][0])(*MODULE_CASES[case_id][1], **MODULE_CASES[case_id][2])
    fresh_torch.load_state_dict(ours_state)  # strict: raises on a missing or unexpected key
    for key, value in fresh_torch.state_dict().items():
        assert torch.equal(value, ours_state[key]), f"{key} did not load into torch.nn"
    assert [name for name, _ in ours.named_parameters()] == [name for name, _ in theirs.named_parameters()]
    assert [name for name, _ in ours.named_buffers()] == [name for name, _ in theirs.named_buffers()]


@pytest.mark.parametrize("case_id", list(MODULE_CASES))
def test_repr_matches_torch(case_id):
    ours, theirs, _ = make_pair(case_id)
    assert repr(ours) == repr(theirs)


@pytest.mark.parametrize("case_id", list(MODULE_CASES))
def test_training_steps_then_evaluation_match_torch(case_id):
    """Four training steps on batches with drifting statistics, then two in evaluation mode."""
    ours, theirs, shape = make_pair(case_id)
    for index, training in enumerate([True, True, True, True, False, False]):
        ours.train(training)
        theirs.train(training)
        x = randn(shape, seed=index, scale=1.0 + index, shift=0.5 * index)
        assert_close_all(step(ours, x, seed=50 + index), step(theirs, x, seed=50 + index), torch.float32, f"step {index}")
        assert_close_all(list(ours.buffers()), list(theirs.buffers()), torch.float32, f"buffers after step {index}")


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32])
@pytest.mark.parametrize("case_id", ["BatchNorm2d", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm2d-tracked-cumulative"])
def test_modules_in_other_dtypes_match_torch(case_id, dtype):
    ours, theirs, shape = make_pair(case_id)
    ours.to(dtype)
    theirs.to(dtype)
    for index, training in enumerate([True, False]):
        ours.train(training)
        theirs.train(training)
        x = randn(shape, dtype, seed=index, scale=2.0, shift=1.0)
        assert_close_all(step(ours, x, seed=7), step(theirs, x, seed=7), dtype, f"{dtype} step {index}")
        assert_close_all(list(ours.buffers()), list(theirs.buffers()), dtype, f"buffers after step {index}")


def test_cumulative_average_is_the_plain_mean_of_batch_statistics():
    """momentum=None: after k batches, running_mean is the average of the k batch means."""
    module = normlib.BatchNorm1d(3, momentum=None)
    batches = [randn((10, 3), seed=s, shift=s) for s in range(4)]
    for x in batches:
        module(x)
    expected = torch.stack([x.mean(0) for x in batches]).mean(0)
    torch.testing.assert_close(module.running_mean, expected)
    assert module.num_batches_tracked.item() == 4


def test_train_and_eval_follow_module_mode_not_grad_mode():
    module = normlib.BatchNorm1d(3)
    x = randn((16, 3), shift=5.0)
    with torch.no_grad():
        module(x)  # training mode: statistics must move although no gradient is recorded
    assert module.num_batches_tracked.item() == 1 and module.running_mean.abs().sum() > 0
    module.eval()
    before = module.running_mean.clone()
    with torch.enable_grad():
        y = module(x)  # eval mode: running statistics normalize and do not move
    torch.testing.assert_close(module.running_mean, before)
    expected = (x - module.running_mean) / torch.sqrt(module.running_var + module.eps)
    torch.testing.assert_close(y, expected)


def test_reset_restores_initial_state():
    module = normlib.BatchNorm2d(4)
    fresh = normlib.BatchNorm2d(4)
    with torch.no_grad():
        module.weight.mul_(3)
    module(randn((2, 4, 3, 3), shift=2.0))
    module.reset_parameters()
    for key, value in fresh.state_dict().items():
        assert torch.equal(module.state_dict()[key], value), key


def test_factory_arguments_and_backend_attribute():
    module = normlib.BatchNorm1d(4, dtype=torch.float64, backend="torch")
    assert module.weight.dtype == module.running_mean.dtype == torch.float64
    assert module.num_batches_tracked.dtype == torch.long
    assert module.backend == "torch"
    assert "backend" not in module.state_dict() and "backend='torch'" in repr(module)
    layer = normlib.LayerNorm(4, device="cpu", dtype=torch.bfloat16, backend="torch")
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.device.type == "cpu"
    assert layer(randn((2, 4), torch.bfloat16)).dtype == torch.bfloat16


def test_every_module_loads_a_torch_state_dict_in_a_fresh_interpreter():
    """The issue's "done when", for every module, as a user would type it."""
    constructions = {
        "BatchNorm1d": "(8)",
        "BatchNorm2d": "(8)",
        "LayerNorm": "(8)",
        "RMSNorm": "(8)",
        "GroupNorm": "(2, 8)",
        "InstanceNorm1d": "(8, affine=True, track_running_stats=True)",
        "InstanceNorm2d": "(8)",
    }
    lines = ["import normlib, torch"]
    for name, args in constructions.items():
        lines.append(f"m = normlib.{name}{args}; m.load_state_dict(torch.nn.{name}{args}.state_dict())")
        lines.append(f"torch.nn.{name}{args}.load_state_dict(normlib.{name}{args}.state_dict())")
    lines.append("m = normlib.LayerNorm2d(8); m.load_state_dict(torch.nn.LayerNorm(8).state_dict())")
    lines.append("print('loaded')")
    result = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded"


# ---------------------------------------------------------------------------------------------
# LayerNorm2d: ConvNeXt's channels-first LayerNorm
# ---------------------------------------------------------------------------------------------


def convnext_channels_first_layer_norm(x, weight, bias, eps):
    """The formula as ConvNeXt's reference code writes it for data_format="channels_first"."""
    mean = x.mean(1, keepdim=True)  # (N, 1, H, W)
    var = (x - mean).pow(2).mean(1, keepdim=True)  # (N, 1, H, W)
    x = (x - mean) / torch.sqrt(var + eps)
    return weight[:, None, None] * x + bias[:, None, None]


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_2d_matches_convnext_formula(dtype):
    module = normlib.LayerNorm2d(5)
    assert module.eps == 1e-6
    with torch.no_grad():
        module.weight.copy_(randn((5,), seed=3, shift=1.0))
        module.bias.copy_(randn((5,), seed=4))
    module.to(dtype)
    x = randn((2, 5, 3, 7), dtype, scale=2.0, shift=1.0)
    ours = step(module, x, seed=9)
    # The formula in float64 on the same (rounded) values, with the same upstream gradient.
    leaves = [t.detach().double().requires_grad_() for t in (x, module.weight, module.bias)]
    y = convnext_channels_first_layer_norm(*leaves, eps=1e-6)
    y.backward(randn(x.shape, dtype, seed=9).double())
    expected = [y.detach()] + [leaf.grad for leaf in leaves]
    assert_close_all([t.double() for t in ours], expected, dtype, "LayerNorm2d (y, dx, dweight, dbias)")


def test_layer_norm_2d_is_layer_norm_at_each_pixel_not_over_the_map():
    x = randn((2, 4, 3, 3), scale=3.0)
    y = normlib.LayerNorm2d(4, eps=1e-5)(x)
    per_pixel = F.layer_norm(x.permute(0, 2, 3, 1), (4,)).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, per_pixel)
    whole_map = F.layer_norm(x, (4, 3, 3))  # what LayerNorm([C, H, W]) would compute instead
    assert not torch.allclose(y, whole_map, atol=1e-2)


def test_layer_norm_2d_state_dict_round_trip_with_torch_layer_norm():
    ours = normlib.LayerNorm2d(6, bias=False)
    theirs = nn.LayerNorm(6, bias=False)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.weight, theirs.weight) and ours.bias is None
    nn.LayerNorm(6, bias=False).load_state_dict(ours.state_dict())
    assert list(normlib.LayerNorm2d(6, elementwise_affine=False).state_dict()) == []


def test_sync_batch_norm_takes_bias_like_torch():
    """torch.nn.SyncBatchNorm(..., bias=False) has a weight and no bias; so has normlib's, and
    converting a BatchNorm without bias keeps it without one."""
    ours, theirs = normlib.SyncBatchNorm(5, bias=False), nn.SyncBatchNorm(5, bias=False)
    assert ours.bias is None and ours.weight is not None
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    model = nn.Sequential(nn.Conv2d(2, 5, 1), nn.BatchNorm2d(5, bias=False))
    converted = normlib.convert_sync_batchnorm(model)
    assert isinstance(converted[1], normlib.SyncBatchNorm) and converted[1].bias is None
    x = torch.randn(4, 2, 3, 3)
    torch.testing.assert_close(converted(x), nn.Sequential(model[0], nn.BatchNorm2d(5, bias=False))(x))


@pytest.mark.timeout(60)
def test_sync_batch_norm_refuses_double_backward():
    """Its backward all-reduces outside autograd: a graph of it would be wrong, so create_graph=True
    is an error rather than a silently wrong second derivative."""
    import torch.distributed as dist

    from normlib.distributed import _SyncBatchNormFunction

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        x = torch.randn(4, 3, 2, requires_grad=True)
        weight = torch.ones(3, requires_grad=True)
        y, _, _, _ = _SyncBatchNormFunction.apply(x, weight, None, 1e-5, None)
        (dx,) = torch.autograd.grad(y.pow(2).sum(), x)  # first derivatives work
        assert dx.shape == x.shape
        y, _, _, _ = _SyncBatchNormFunction.apply(x, weight, None, 1e-5, None)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"affine": False, "track_running_stats": False}, {"momentum": None}])
def test_lazy_batch_norm_becomes_batch_norm_like_torch(dims, kwargs):
    """LazyBatchNorm{1,2,3}d read C from the first input and turn into normlib.BatchNorm{1,2,3}d,
    with torch's repr, state_dict and outputs along the way."""
    ours, theirs = getattr(normlib, f"LazyBatchNorm{dims}d")(**kwargs), getattr(nn, f"LazyBatchNorm{dims}d")(**kwargs)
    assert repr(ours) == repr(theirs)
    shape = (4, 3) + (2,) * dims if dims > 1 else (4, 3, 5)
    for seed in range(2):
        x = randn(shape, seed=seed)
        torch.testing.assert_close(ours(x), theirs(x))
    assert type(ours) is getattr(normlib, f"BatchNorm{dims}d")
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)
