"""Every documented bad input fails with the documented error, whose message names the argument.

Convention (normlib/_checks.py): a wrong type or dtype raises TypeError; a wrong shape, value or
device raises ValueError. Devices are mismatched with the "meta" device, which exists everywhere.
"""

from __future__ import annotations

import pytest
import torch
from norm_cases import randn

import normlib

X = randn((4, 6, 5))  # (N, C, L): C = 6 channels, last dim 5
W6, W5 = torch.ones(6), torch.ones(5)
META5, META6 = torch.ones(5, device="meta"), torch.ones(6, device="meta")


def call_each_op(**overrides):
    """Every op with correct arguments, except for what ``overrides`` replaces."""
    x = overrides.get("input", X)
    return {
        "layer_norm": lambda: normlib.layer_norm(x, (5,), overrides.get("weight5", W5), overrides.get("bias5", W5)),
        "add_layer_norm": lambda: normlib.add_layer_norm(x, x, (5,), overrides.get("weight5", W5), overrides.get("bias5", W5)),
        "rms_norm": lambda: normlib.rms_norm(x, (5,), overrides.get("weight5", W5)),
        "add_rms_norm": lambda: normlib.add_rms_norm(x, x, (5,), overrides.get("weight5", W5)),
        "batch_norm": lambda: normlib.batch_norm(x, None, None, overrides.get("weight6", W6), overrides.get("bias6", W6), True),
        "group_norm": lambda: normlib.group_norm(x, 2, overrides.get("weight6", W6), overrides.get("bias6", W6)),
        "instance_norm": lambda: normlib.instance_norm(x, None, None, overrides.get("weight6", W6), overrides.get("bias6", W6)),
    }


OPS = list(call_each_op())


@pytest.mark.parametrize("op", OPS)
def test_integer_input_is_a_type_error(op):
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        call_each_op(input=torch.ones(4, 6, 5, dtype=torch.int64))[op]()


@pytest.mark.parametrize("op", OPS)
def test_non_tensor_input_is_a_type_error(op):
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        call_each_op(input=X.tolist())[op]()


@pytest.mark.parametrize("op", OPS)
def test_weight_of_wrong_shape(op):
    with pytest.raises(ValueError, match=r"weight must have shape \((5|6),\), got \(7,\)"):
        call_each_op(weight5=torch.ones(7), weight6=torch.ones(7))[op]()


@pytest.mark.parametrize("op", [op for op in OPS if "rms" not in op])  # RMSNorm has no bias
def test_bias_of_wrong_shape(op):
    with pytest.raises(ValueError, match=r"bias must have shape \((5|6),\), got \(1, (5|6)\)"):
        call_each_op(bias5=torch.ones(1, 5), bias6=torch.ones(1, 6))[op]()


@pytest.mark.parametrize("op", OPS)
def test_integer_weight_is_a_type_error(op):
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        call_each_op(weight5=torch.ones(5, dtype=torch.int32), weight6=torch.ones(6, dtype=torch.int32))[op]()


@pytest.mark.parametrize("op", OPS)
def test_weight_on_another_device(op):
    with pytest.raises(ValueError, match="weight is on device meta but input is on cpu"):
        call_each_op(weight5=META5, weight6=META6)[op]()


@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm"])
def test_normalized_shape_not_matching_trailing_dims(op):
    calls = {
        "layer_norm": lambda: normlib.layer_norm(X, (6,)),
        "add_layer_norm": lambda: normlib.add_layer_norm(X, X, (4, 5, 6)),
        "rms_norm": lambda: normlib.rms_norm(X, [5, 6]),
        "add_rms_norm": lambda: normlib.add_rms_norm(X, X, 4),
    }
    with pytest.raises(ValueError, match=r"normalized_shape=\[.*\] must equal the last"):
        calls[op]()


@pytest.mark.parametrize("bad", ["5", 5.0, (5.0,), ()])
def test_normalized_shape_of_wrong_type(bad):
    with pytest.raises((TypeError, ValueError), match="normalized_shape must"):
        normlib.layer_norm(X, bad)


@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
@pytest.mark.parametrize(
    "residual,error,message",
    [
        (randn((4, 6, 4)), ValueError, "residual must have the shape of input"),
        (randn((4, 6, 5), torch.float64), TypeError, "residual must have the dtype of input"),
        (torch.ones(4, 6, 5, device="meta"), ValueError, "residual is on device meta"),
    ],
)
def test_residual_not_matching_input(op, residual, error, message):
    fn = getattr(normlib, op)
    with pytest.raises(error, match=message):
        fn(X, residual, (5,))


@pytest.mark.parametrize("eps", [-1e-5, float("nan")])
def test_negative_or_nan_eps(eps):
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        normlib.layer_norm(X, (5,), eps=eps)
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        normlib.rms_norm(X, (5,), eps=eps)


def test_group_norm_channels_not_divisible_by_groups():
    with pytest.raises(ValueError, match="must be divisible by num_groups=4"):
        normlib.group_norm(X, 4)
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        normlib.group_norm(X, 0)
    with pytest.raises(ValueError, match="num_channels=8 must be divisible by num_groups=3"):
        normlib.GroupNorm(3, 8)


def test_module_sizes_must_be_integers():
    """Any integer type is a size (NumPy's too, as in torch); a float or a negative one is not."""
    with pytest.raises(TypeError, match="num_features must be an int, got 2.5"):
        normlib.BatchNorm1d(2.5)
    with pytest.raises(ValueError, match="num_features must be a non-negative int, got -1"):
        normlib.InstanceNorm1d(-1)
    with pytest.raises(TypeError, match="num_groups must be an int"):
        normlib.GroupNorm(2.0, 6)
    with pytest.raises(ValueError, match="num_groups must be a positive int, got 0"):
        normlib.GroupNorm(0, 6)
    with pytest.raises(TypeError, match="num_channels must be an int"):
        normlib.LayerNorm2d("8")
    with pytest.raises(TypeError, match="normalized_shape must be an int or a non-empty sequence of ints"):
        normlib.LayerNorm("8")
    with pytest.raises(TypeError, match="normalized_shape must be an int or a non-empty sequence of ints"):
        normlib.RMSNorm([4.0])


def test_triton_backend_refuses_what_its_float32_kernels_cannot_compute_exactly():
    if "triton" not in normlib.available_backends("layer_norm", "cpu"):
        pytest.skip("triton does not run on this machine's CPU (TRITON_INTERPRET is off)")
    for dtype in (torch.float64, torch.complex64):
        with pytest.raises(TypeError, match=f"backend='triton' cannot run this input: .*got {dtype}"):
            normlib.rms_norm(torch.randn(2, 5, dtype=dtype), 5, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        normlib.add_layer_norm(X.double(), X.double(), 5, backend="triton")


def test_batch_norm_training_with_one_value_per_channel():
    message = "more than one value per channel"
    with pytest.raises(ValueError, match=message):
        normlib.batch_norm(randn((1, 6)), None, None, training=True)
    with pytest.raises(ValueError, match=message):
        normlib.BatchNorm2d(6)(randn((1, 6, 1, 1)))
    # evaluation uses the running statistics: one sample is fine
    normlib.BatchNorm2d(6).eval()(randn((1, 6, 1, 1)))


def test_instance_norm_with_one_spatial_position():
    with pytest.raises(ValueError, match="more than one spatial position"):
        normlib.instance_norm(randn((4, 6, 1)))


def test_running_statistics_errors():
    mean, var = torch.zeros(6), torch.ones(6)
    with pytest.raises(ValueError, match=r"running_mean must have shape \(6,\), got \(5,\)"):
        normlib.batch_norm(X, torch.zeros(5), var, training=True)
    with pytest.raises(ValueError, match=r"running_var must have shape \(6,\), got \(7,\)"):
        normlib.instance_norm(X, mean, torch.ones(7))
    with pytest.raises(ValueError, match="running_mean and running_var must be given together"):
        normlib.batch_norm(X, mean, None, training=True)
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        normlib.batch_norm(X, None, None, training=False)
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        normlib.instance_norm(X, use_input_stats=False)
    with pytest.raises(ValueError, match="running_mean is on device meta"):
        normlib.batch_norm(X, META6, var, training=True)
    with pytest.raises(ValueError, match="eps must be positive when training"):
        normlib.batch_norm(X, None, None, training=True, eps=0.0)


@pytest.mark.parametrize(
    "module,shape,message",
    [
        (normlib.BatchNorm1d(6), (4, 6, 2, 2), "BatchNorm1d expects input of shape"),
        (normlib.BatchNorm2d(6), (4, 6, 5), "BatchNorm2d expects input of shape"),
        (normlib.InstanceNorm1d(6), (4, 6, 2, 2), "InstanceNorm1d expects input of shape"),
        (normlib.InstanceNorm2d(6), (6, 5), "InstanceNorm2d expects input of shape"),
        (normlib.LayerNorm2d(6), (4, 6, 5), "LayerNorm2d expects input of shape"),
        (normlib.LayerNorm2d(6), (4, 5, 2, 2), r"C = num_channels = 6"),
        (normlib.InstanceNorm2d(6, affine=True), (4, 5, 2, 2), "to match num_features=6"),
    ],
)
def test_module_input_of_wrong_rank_or_width(module, shape, message):
    with pytest.raises(ValueError, match=message):
        module(randn(shape))


def test_input_with_too_few_dimensions():
    with pytest.raises(ValueError, match=r"input must have at least 3 dimensions"):
        normlib.instance_norm(randn((4, 6)))
    with pytest.raises(ValueError, match=r"input must have at least 2 dimensions"):
        normlib.batch_norm(randn((6,)), None, None, training=True)
    with pytest.raises(ValueError, match="normalized_shape"):
        normlib.layer_norm(randn((5,)), (1, 5))


@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "LayerNorm", "LayerNorm2d", "RMSNorm", "InstanceNorm1d", "InstanceNorm2d"])
def test_module_with_unknown_backend_fails_at_construction(name):
    with pytest.raises(ValueError, match="backend='cuda' is not a known backend"):
        getattr(normlib, name)(6, backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda' is not a known backend"):
        normlib.GroupNorm(2, 6, backend="cuda")
