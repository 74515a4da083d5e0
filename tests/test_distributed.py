"""normlib.SyncBatchNorm: equal to one BatchNorm over the concatenated batch, on 2 and 3 processes.

The multi-process tests spawn gloo processes on localhost through normlib.book.distributed_demo.launch,
which joins them with a timeout and re-raises a child's exception here. Each launch runs every
case in the same processes, because starting a process that imports torch costs seconds.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import normlib
from normlib.book.distributed_demo import launch
from normlib.distributed import (
    SyncBatchNorm,
    check_backend_supports,
    convert_sync_batchnorm,
    local_moments,
    merge_moments,
    revert_sync_batchnorm,
)

# Per-dtype tolerance of the input (atol, rtol): a result passes when |ours - reference| <=
# atol + rtol * |reference| everywhere. float32 and float64 differ from the reference only in the
# order of the sums; bfloat16 outputs and input gradients are rounded to 8 significant bits.
TOLERANCE = {"float64": (1e-12, 1e-10), "float32": (1e-5, 1e-4), "bfloat16": (1e-2, 1.6e-2)}

CASES = [
    # (input dtype, parameter dtype, trailing shape after (N, C), momentum)
    ("float32", "float32", (5, 4), 0.1),
    ("float64", "float64", (5, 4), 0.1),
    ("float64", "float64", (), None),  # (N, C) features; momentum=None: cumulative average
    ("float32", "float32", (7,), 0.3),  # (N, C, L) sequences
    ("bfloat16", "float32", (3, 3), 0.1),  # mixed precision: bf16 activations, fp32 parameters
]


def relative_error(ours: torch.Tensor, reference: torch.Tensor, dtype_name: str) -> float:
    """max |ours - reference| / (atol + rtol * |reference|): at most 1 within tolerance."""
    atol, rtol = TOLERANCE[dtype_name]
    if ours.numel() == 0:
        return 0.0
    ours, reference = ours.double(), reference.double()
    return ((ours - reference).abs() / (atol + rtol * reference.abs())).max().item()


# ----------------------------------------------------------------------------------------------
# Workers: run in spawned processes, so they must be module-level functions
# ----------------------------------------------------------------------------------------------


def compare_with_single_process(rank: int, world_size: int, sizes: list[int], steps: int) -> dict:
    """Per case, the relative errors (see :func:`relative_error`) of SyncBatchNorm on this rank's
    slice against torch.nn.BatchNorm on the whole batch (in the parameters' dtype), over ``steps``
    training steps and one eval step."""
    errors = {}
    for dtype_name, param_dtype_name, tail, momentum in CASES:
        dtype, param_dtype = getattr(torch, dtype_name), getattr(torch, param_dtype_name)
        channels = 3
        generator = torch.Generator().manual_seed(1234)
        sync_bn = SyncBatchNorm(channels, momentum=momentum, dtype=param_dtype)
        single = nn.BatchNorm1d(channels, momentum=momentum, dtype=param_dtype)
        with torch.no_grad():  # the same non-trivial affine parameters in both
            weight = torch.rand(channels, generator=generator, dtype=param_dtype) + 0.5
            bias = torch.randn(channels, generator=generator, dtype=param_dtype)
            for module in (sync_bn, single):
                module.weight.copy_(weight)
                module.bias.copy_(bias)
        start, end = sum(sizes[:rank]), sum(sizes[: rank + 1])
        worst = {"output": 0.0, "input grad": 0.0, "param grads": 0.0}

        def err(ours, reference):
            return relative_error(ours, reference, dtype_name)

        for _ in range(steps):
            # Every rank draws the same global batch and keeps its own slice; the reference sees
            # exactly the same (rounded) values, in the parameters' dtype.
            x_all = (torch.randn((sum(sizes), channels) + tail, generator=generator, dtype=param_dtype) * 3 + 2).to(dtype)
            dy_all = torch.randn(x_all.shape, generator=generator, dtype=param_dtype).to(dtype)
            x = x_all[start:end].clone().requires_grad_()
            x_ref = x_all.to(param_dtype).requires_grad_()
            sync_bn.zero_grad()
            single.zero_grad()
            y = sync_bn(x)
            assert y.dtype == dtype
            (y.to(param_dtype) * dy_all[start:end].to(param_dtype)).sum().backward()
            y_ref = single(x_ref.reshape(x_ref.shape[0], channels, -1)).reshape(x_ref.shape)  # BatchNorm1d: (N, C, L)
            (y_ref * dy_all.to(param_dtype)).sum().backward()
            # Each process holds the gradient of its own samples' loss; their sum is the whole's.
            grads = torch.cat([sync_bn.weight.grad, sync_bn.bias.grad])
            dist.all_reduce(grads)
            worst["output"] = max(worst["output"], err(y, y_ref[start:end]))
            worst["input grad"] = max(worst["input grad"], err(x.grad, x_ref.grad[start:end]))
            ref_grads = torch.cat([single.weight.grad, single.bias.grad])
            worst["param grads"] = max(worst["param grads"], err(grads, ref_grads))
        worst["running mean"] = err(sync_bn.running_mean, single.running_mean)
        worst["running var"] = err(sync_bn.running_var, single.running_var)
        worst["batches tracked"] = abs(sync_bn.num_batches_tracked.item() - single.num_batches_tracked.item())
        sync_bn.eval()
        single.eval()
        x_eval = torch.randn((4, channels) + tail, generator=generator, dtype=param_dtype).to(dtype)
        y_eval = single(x_eval.to(param_dtype).reshape(4, channels, -1)).reshape(x_eval.shape)
        worst["eval output"] = err(sync_bn(x_eval), y_eval)
        errors[f"{dtype_name} input, {param_dtype_name} parameters, {tail}, momentum={momentum}"] = worst
    return errors


def fail_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()  # rank 0 waits here for a peer that never comes: the launcher must not hang
    return rank


# ----------------------------------------------------------------------------------------------
# Multi-process tests
# ----------------------------------------------------------------------------------------------


def _assert_matches(results: list[dict]) -> None:
    for rank, errors in enumerate(results):
        for case, worst in errors.items():
            for quantity, error in worst.items():
                assert error <= 1.0, (
                    f"rank {rank}, {case}: {quantity} differs from BatchNorm on the whole batch by "
                    f"{error:.3g} times the tolerance"
                )


@pytest.mark.timeout(120)
def test_two_processes_unequal_batches_match_one_batch_norm():
    # Rank 1 has one sample: for (N, C) inputs that is one value per channel, which a plain
    # BatchNorm cannot normalize in training, and the synchronized one must.
    results = launch(compare_with_single_process, 2, [3, 1], 3, timeout=100)
    _assert_matches(results)


@pytest.mark.timeout(120)
def test_three_processes_with_an_empty_batch_match_one_batch_norm():
    results = launch(compare_with_single_process, 3, [4, 0, 2], 3, timeout=100)
    _assert_matches(results)


@pytest.mark.timeout(120)
def test_launch_reports_a_child_exception_instead_of_hanging():
    with pytest.raises(RuntimeError, match="deliberate failure on rank 1"):
        launch(fail_on_rank_one, 2, timeout=60)


# ----------------------------------------------------------------------------------------------
# Single-process behaviour: exactly BatchNorm
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track_running_stats", [True, False])
def test_without_process_group_it_is_batch_norm_2d(momentum, affine, track_running_stats):
    assert not dist.is_initialized()
    torch.manual_seed(0)
    kwargs = dict(momentum=momentum, affine=affine, track_running_stats=track_running_stats)
    ours, theirs = SyncBatchNorm(4, **kwargs), nn.BatchNorm2d(4, **kwargs)
    if affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.normal_()
        theirs.load_state_dict(ours.state_dict())
    for _ in range(3):
        x = (torch.randn(6, 4, 3, 5) * 2 + 1).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = ours(x), theirs(x_ref)
        dy = torch.randn_like(y)
        (y * dy).sum().backward()
        (y_ref * dy).sum().backward()
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(x.grad, x_ref.grad)
    if affine:
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.timeout(60)
def test_world_size_one_is_batch_norm_2d():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(1)
        ours, theirs = SyncBatchNorm(3), nn.BatchNorm2d(3)
        x = torch.randn(4, 3, 2, 2)
        torch.testing.assert_close(ours(x), theirs(x))
        torch.testing.assert_close(ours.running_var, theirs.running_var)
    finally:
        dist.destroy_process_group()


def test_state_dict_moves_between_torch_batch_norm_and_sync_batch_norm():
    torch.manual_seed(2)
    theirs = nn.BatchNorm2d(5)
    theirs(torch.randn(8, 5, 2, 2))  # non-default running statistics and num_batches_tracked
    ours = SyncBatchNorm(5)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    back = nn.SyncBatchNorm(5)
    back.load_state_dict(ours.state_dict())
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, msg=key)


# ----------------------------------------------------------------------------------------------
# The merge formula
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[5], [3, 1], [4, 0, 2], [0, 0, 7, 1], [1, 1]])
def test_merge_moments_equals_moments_of_the_concatenation(sizes):
    rng = np.random.default_rng(sum(sizes))
    # A large common offset with a small spread: sum(x^2) - n * mean^2 would lose every digit.
    chunks = [torch.from_numpy(rng.normal(1e4, 1e-2, size=(n, 3, 2))) for n in sizes]
    moments = [local_moments(chunk) for chunk in chunks]
    counts = torch.tensor([float(m[0]) for m in moments], dtype=torch.float64)
    count, mean, m2 = merge_moments(counts, torch.stack([m[1] for m in moments]), torch.stack([m[2] for m in moments]))
    whole = torch.cat(chunks).numpy()  # (N, C, L)
    assert count.item() == whole.shape[0] * whole.shape[2]
    np.testing.assert_allclose(mean.numpy(), whole.mean(axis=(0, 2)), rtol=1e-14)
    expected_m2 = ((whole - whole.mean(axis=(0, 2), keepdims=True)) ** 2).sum(axis=(0, 2))
    np.testing.assert_allclose(m2.numpy(), expected_m2, rtol=1e-9)


def test_local_moments_accumulate_half_precision_in_float32():
    x = torch.randn(4, 2, 8, dtype=torch.float64) + 100
    count, mean, m2 = local_moments(x.to(torch.bfloat16))
    assert count == 32 and mean.dtype == torch.float32 and m2.dtype == torch.float32
    count, mean, m2 = local_moments(torch.empty(0, 2, 8))
    assert count == 0 and mean.tolist() == [0.0, 0.0] and m2.tolist() == [0.0, 0.0]


def test_merge_moments_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="counts of shape"):
        merge_moments(torch.ones(2), torch.zeros(3, 4), torch.zeros(3, 4))


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_rejects_input_with_fewer_than_two_dimensions():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        SyncBatchNorm(3)(torch.randn(3))


def test_rejects_input_whose_channels_do_not_match():
    with pytest.raises(ValueError, match="num_features=3.*4 channels"):
        SyncBatchNorm(3)(torch.randn(2, 4, 5))


@pytest.mark.parametrize(
    "backend, device, message",
    [
        ("nccl", "cpu", "'nccl' synchronizes only cuda"),
        ("gloo", "cuda", "'gloo' synchronizes only cpu"),
        ("cuda:nccl", "cpu", "backends only for \\['cuda'\\]"),
    ],
)
def test_rejects_a_process_group_backend_that_cannot_handle_the_device(backend, device, message):
    with pytest.raises(ValueError, match=message):
        check_backend_supports(backend, torch.device(device))


@pytest.mark.parametrize("backend, device", [("gloo", "cpu"), ("nccl", "cuda"), ("cpu:gloo,cuda:nccl", "cpu"),
                                             ("cpu:gloo,cuda:nccl", "cuda"), ("some_plugin", "cpu")])
def test_accepts_backends_that_handle_the_device(backend, device):
    check_backend_supports(backend, torch.device(device))


# ----------------------------------------------------------------------------------------------
# Converting a model
# ----------------------------------------------------------------------------------------------


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        normlib.BatchNorm2d(4),
        nn.Sequential(nn.BatchNorm2d(4, momentum=None), nn.Flatten(2)),  # nested
        nn.BatchNorm1d(4, eps=1e-3),
        nn.Unflatten(2, (2, 2, 16)),
        nn.BatchNorm3d(4, affine=False),
    )


def test_convert_replaces_every_batch_norm_and_keeps_the_computation():
    torch.manual_seed(3)
    model = _model()
    model(torch.randn(8, 1, 8, 8))  # move the running statistics away from their defaults
    original_types = [type(m) for m in model.modules()]
    converted = convert_sync_batchnorm(copy.deepcopy(model))

    kinds = [type(m) for m in converted.modules()]
    assert kinds.count(SyncBatchNorm) == 4
    assert not any(t in kinds for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, normlib.BatchNorm2d))
    assert converted[2][0].momentum is None and converted[3].eps == 1e-3 and not converted[5].affine
    x = torch.randn(5, 1, 8, 8)
    for training in (False, True, True):  # train twice: the running statistics must move alike
        torch.testing.assert_close(converted.train(training)(x), model.train(training)(x))
    torch.testing.assert_close(converted.state_dict(), model.state_dict())

    reverted = revert_sync_batchnorm(converted)
    assert [type(m) for m in reverted.modules()] == original_types


def test_convert_shares_parameters_so_an_existing_optimizer_keeps_working():
    bn = nn.BatchNorm2d(3)
    converted = convert_sync_batchnorm(bn)
    assert isinstance(converted, SyncBatchNorm)
    assert converted.weight is bn.weight and converted.running_var is bn.running_var


def test_revert_needs_a_default_for_a_layer_built_directly():
    with pytest.raises(ValueError, match="default="):
        revert_sync_batchnorm(nn.Sequential(SyncBatchNorm(3)))
    reverted = revert_sync_batchnorm(nn.Sequential(SyncBatchNorm(3)), default=normlib.BatchNorm2d)
    assert type(reverted[0]) is normlib.BatchNorm2d


def test_convert_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        convert_sync_batchnorm("model")
