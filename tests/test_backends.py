"""How the public ops choose an implementation, tested through what normlib.backends promises.

normlib's "cpu" and "triton" backends are built by others; here they are exercised only through
the public ops and available_backends(), and skipped where this machine does not have them.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from norm_cases import TOLERANCES, randn

import normlib
from normlib import backends

CPU = torch.device("cpu")
X = randn((3, 4, 8))  # (N, C, L)
W4, W8 = randn((4,), seed=1, shift=1.0), randn((8,), seed=2, shift=1.0)

# op -> (normlib call taking backend=..., the torch.nn.functional result it must reproduce)
CALLS = {
    "layer_norm": (lambda backend: normlib.layer_norm(X, (8,), W8, W8, backend=backend), lambda: F.layer_norm(X, (8,), W8, W8)),
    "add_layer_norm": (lambda backend: normlib.add_layer_norm(X, X, (8,), W8, W8, backend=backend)[0], lambda: F.layer_norm(2 * X, (8,), W8, W8)),
    "rms_norm": (lambda backend: normlib.rms_norm(X, (8,), W8, backend=backend), lambda: F.rms_norm(X, (8,), W8)),
    "add_rms_norm": (lambda backend: normlib.add_rms_norm(X, X, (8,), W8, backend=backend)[0], lambda: F.rms_norm(2 * X, (8,), W8)),
    "batch_norm": (lambda backend: normlib.batch_norm(X, None, None, W4, W4, True, backend=backend), lambda: F.batch_norm(X, None, None, W4, W4, True)),
    "group_norm": (lambda backend: normlib.group_norm(X, 2, W4, W4, backend=backend), lambda: F.group_norm(X, 2, W4, W4)),
    "instance_norm": (lambda backend: normlib.instance_norm(X, None, None, W4, W4, backend=backend), lambda: F.instance_norm(X, None, None, W4, W4)),
    "dyt": (lambda backend: normlib.dyt(X, 0.5, W8, W8, backend=backend), lambda: W8 * torch.tanh(0.5 * X) + W8),
}


def test_every_op_has_a_torch_implementation_that_exists():
    assert set(CALLS) == set(backends.IMPLEMENTATIONS)
    for op, implementations in backends.IMPLEMENTATIONS.items():
        module_name, function_name = implementations["torch"].split(":")
        assert callable(getattr(importlib.import_module(module_name), function_name)), op


def test_available_backends_always_contains_torch():
    assert "torch" in normlib.available_backends()
    for op in backends.IMPLEMENTATIONS:
        assert "torch" in normlib.available_backends(op, "cpu")
    with pytest.raises(ValueError, match="op='softmax' is not one of"):
        normlib.available_backends("softmax")


@pytest.mark.parametrize("op", list(CALLS))
def test_unknown_backend_lists_the_available_ones(op):
    ours, _ = CALLS[op]
    with pytest.raises(ValueError, match=r"backend='tpu' is not a known backend; expected 'auto' or one of .*'torch'") as info:
        ours("tpu")
    assert f"available for {op} on cpu: " in str(info.value)


@pytest.mark.parametrize("op", list(CALLS))
@pytest.mark.parametrize("backend", ["auto", "torch", "cpu", "triton"])
def test_every_available_backend_reproduces_torch(op, backend):
    if backend not in ("auto", *normlib.available_backends(op, CPU)):
        pytest.skip(f"{backend!r} does not run {op} on this machine's CPU")
    ours, theirs = CALLS[op]
    torch.testing.assert_close(ours(backend), theirs(), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("op", list(CALLS))
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_unavailable_backend_explains_itself(op, backend):
    if backend in normlib.available_backends(op, CPU):
        pytest.skip(f"{backend!r} runs {op} here")
    ours, _ = CALLS[op]
    with pytest.raises(RuntimeError, match=rf"backend='{backend}' cannot run {op} here: .+\. Available for {op} on cpu: \[.*'torch'"):
        ours(backend)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_triton_on_a_cpu_tensor_without_the_interpreter_says_how_to_enable_it(op, monkeypatch):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: the error is then about installing it")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ours, _ = CALLS[op]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ours("triton")


def test_auto_picks_the_first_backend_of_the_device_order_that_can_run():
    for op, implementations in backends.IMPLEMENTATIONS.items():
        runnable = normlib.available_backends(op, CPU)
        expected = next((name for name in backends.AUTO_ORDER["cpu"] if name in runnable), "torch")
        module_name, function_name = implementations[expected].split(":")
        assert backends.resolve(op, "auto", CPU) is getattr(importlib.import_module(module_name), function_name), op


@pytest.mark.parametrize(
    "op,call,expected_args",
    [
        # normalized_shape as a tuple, rms_norm's eps=None resolved to a float, backend dropped
        ("layer_norm", lambda: normlib.layer_norm(X, 8, W8), (X, (8,), W8, None, 1e-5)),
        ("rms_norm", lambda: normlib.rms_norm(X, [8], backend="torch"), (X, (8,), None, torch.finfo(torch.float32).eps)),
        ("add_rms_norm", lambda: normlib.add_rms_norm(X, X, torch.Size([8]), W8, 1e-3), (X, X, (8,), W8, 1e-3)),
        ("batch_norm", lambda: normlib.batch_norm(X, None, None, training=True), (X, None, None, None, None, True, 0.1, 1e-5)),
        ("group_norm", lambda: normlib.group_norm(X, 4), (X, 4, None, None, 1e-5)),
        ("instance_norm", lambda: normlib.instance_norm(X), (X, None, None, None, None, True, 0.1, 1e-5)),
    ],
)
def test_implementations_receive_the_checked_arguments_positionally(op, call, expected_args, monkeypatch):
    """The contract other backends rely on (see IMPLEMENTATIONS in normlib/backends.py)."""
    received = {}

    def spy(*args, **kwargs):
        received.update(args=args, kwargs=kwargs)
        return X

    def fake_resolve(op_name, backend, device):
        received.update(op=op_name, backend=backend, device=device)
        return spy

    module = importlib.import_module(f"normlib.{op.removeprefix('add_')}")
    monkeypatch.setattr(module, "resolve", fake_resolve)
    call()
    assert received["op"] == op and received["device"] == CPU and received["kwargs"] == {}
    assert len(received["args"]) == len(expected_args)
    for index, (got, expected) in enumerate(zip(received["args"], expected_args)):
        if isinstance(expected, torch.Tensor):
            assert got is expected, f"argument {index} is not the caller's tensor"
        else:
            assert got == expected and type(got) is type(expected), f"argument {index}: {got!r} != {expected!r}"


def test_available_backends_without_device_lists_only_what_this_machine_can_run(monkeypatch):
    import torch

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    listed = normlib.available_backends()
    assert "cpu" in listed
    if not torch.cuda.is_available():
        assert "triton" not in listed, "triton needs a GPU (or the interpreter) to run anything"
