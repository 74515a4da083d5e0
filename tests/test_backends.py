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


def test_every_implementation_in_the_table_exists_and_torch_takes_every_input():
    assert set(CALLS) == set(backends.IMPLEMENTATIONS)
    for op, by_backend in backends.IMPLEMENTATIONS.items():
        assert set(by_backend) <= set(backends.BACKENDS), op
        torch_implementations = by_backend["torch"]
        assert len(torch_implementations) == 1 and torch_implementations[0].supports(X, None, None) is None, op
        for name, implementations in by_backend.items():
            assert implementations, (op, name)
            for implementation in implementations:
                if name == "triton" and importlib.util.find_spec("triton") is None:
                    continue
                module_name, function_name = implementation.function.split(":")
                assert callable(getattr(importlib.import_module(module_name), function_name)), implementation
                assert callable(implementation.supports), implementation


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
@pytest.mark.parametrize("kernels", ["not imported", "compiled for the GPU"])
def test_triton_on_a_cpu_tensor_without_the_interpreter_says_how_to_enable_it(op, kernels, monkeypatch):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: the error is then about installing it")
    import sys

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(backends, "_CANDIDATES", {})
    if kernels == "not imported":  # TRITON_INTERPRET decides
        monkeypatch.delitem(sys.modules, "normlib.kernels._rows", raising=False)
        expected = r"TRITON_INTERPRET=1 is set before triton is imported\); got a tensor on 'cpu'"
    else:  # imported: their mode decides, whatever the environment says now
        from normlib.kernels import _rows

        monkeypatch.setattr(_rows, "INTERPRETED", False)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        expected = "already imported compiled for the GPU, so set it before the first import"
    ours, _ = CALLS[op]
    with pytest.raises(RuntimeError, match=expected):
        ours("triton")
    assert "triton" not in normlib.available_backends(op, CPU)


def _implementation_of(function) -> tuple[str, str]:
    """(backend, "module:function") of the table entry that names ``function``."""
    target = f"{function.__module__}:{function.__name__}"
    for by_backend in backends.IMPLEMENTATIONS.values():
        for name, implementations in by_backend.items():
            if any(i.function == target for i in implementations):
                return name, target
    raise AssertionError(f"{target} is not in normlib.backends.IMPLEMENTATIONS")


def test_auto_picks_the_first_implementation_of_the_device_order_that_takes_the_input():
    for op, by_backend in backends.IMPLEMENTATIONS.items():
        runnable = [name for name in backends.AUTO_ORDER["cpu"] if name in normlib.available_backends(op, CPU)]
        expected = next(
            impl.function
            for name in runnable
            for impl in by_backend[name]
            if impl.supports(X, W8, W8) is None
        )
        assert _implementation_of(backends.resolve(op, "auto", X, W8, W8))[1] == expected, op


def _c_kernels(name: str) -> bool:
    from normlib.cpu import native

    return native.unavailable_reason(name) is None


@pytest.mark.parametrize(
    "op,input_dtype,weight_dtype,expected",
    [
        # the C kernels take one dtype for input and weight; the rest runs blocked PyTorch
        ("rms_norm", torch.float32, torch.float32, "normlib.cpu:rms_norm_c"),
        ("rms_norm", torch.bfloat16, torch.bfloat16, "normlib.cpu:rms_norm_c"),
        ("rms_norm", torch.bfloat16, torch.float32, "normlib.cpu:rms_norm_blocked"),
        ("rms_norm", torch.float64, torch.float64, "normlib.cpu:rms_norm_blocked"),
        ("rms_norm", torch.complex64, None, "normlib.rms_norm:rms_norm_torch"),
        ("add_rms_norm", torch.float32, None, "normlib.cpu:add_rms_norm_c"),
        ("add_rms_norm", torch.float64, None, "normlib.cpu:add_rms_norm_blocked"),
        ("add_layer_norm", torch.float32, torch.float32, "normlib.cpu:add_layer_norm_c"),
        ("add_layer_norm", torch.float16, torch.float32, "normlib.cpu:add_layer_norm_aten"),
        ("add_layer_norm", torch.float64, torch.float64, "normlib.cpu:add_layer_norm_aten"),
    ],
)
def test_the_cpu_backend_runs_what_its_rules_choose(op, input_dtype, weight_dtype, expected):
    if expected.endswith("_c") and not _c_kernels(op.removeprefix("add_")):
        pytest.skip("the C kernels are not built on this machine")
    x = X.to(input_dtype)
    weight = None if weight_dtype is None else W8.to(weight_dtype)
    bias = weight if op == "add_layer_norm" else None
    for backend in ("cpu", "auto"):
        assert _implementation_of(backends.resolve(op, backend, x, weight, bias)) == ("cpu" if "normlib.cpu" in expected else "torch", expected)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"])
def test_the_triton_backend_refuses_float64_sends_empty_input_to_torch(op):
    if "triton" not in normlib.available_backends(op, CPU):
        pytest.skip("triton does not run on this machine's CPU (not installed, or TRITON_INTERPRET is off)")
    with pytest.raises(TypeError, match=r"backend='triton' cannot run this input: the 'triton' kernels compute in float32.*got torch.float64"):
        backends.resolve(op, "triton", X.double())
    assert _implementation_of(backends.resolve(op, "triton", X)) == ("triton", f"normlib.kernels.{op.removeprefix('add_')}:{op}_triton")
    assert _implementation_of(backends.resolve(op, "triton", X[:0])) == ("torch", f"normlib.{op.removeprefix('add_')}:{op}_torch")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_under_torch_func_every_backend_runs_torchs_op(backend):
    if backend not in normlib.available_backends("rms_norm", CPU):
        pytest.skip(f"{backend!r} does not run on this machine's CPU")
    chosen = []

    def norm(x):
        chosen.append(backends.resolve("rms_norm", backend, x, W8))
        return normlib.rms_norm(x, (8,), W8, backend=backend)

    torch.func.vmap(norm)(X)
    torch.func.grad(lambda x: norm(x).sum())(X)
    assert [f.__name__ for f in chosen] == ["rms_norm_torch"] * 2
    assert backends.resolve("rms_norm", backend, X, W8).__name__ != "rms_norm_torch"


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

    def fake_resolve(op_name, backend, input, *parameters):
        received.update(op=op_name, backend=backend, device=input.device)
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

    import sys

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delitem(sys.modules, "normlib.kernels._rows", raising=False)  # else their mode decides
    listed = normlib.available_backends()
    assert "cpu" in listed
    if not torch.cuda.is_available():
        assert "triton" not in listed, "triton needs a GPU (or the interpreter) to run anything"


def _runs_lines(text: str) -> list[str]:
    return [line for line in text.splitlines()[1:] if line.endswith(" runs")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm", "add_layer_norm", "layer_norm", "group_norm"])
def test_explain_dispatch_names_what_resolve_runs(op, dtype):
    x = X.to(dtype)
    weight = W8 if op != "group_norm" else None  # float32: the C kernels refuse it beside bfloat16 input
    bias = W8 if op in ("add_layer_norm", "layer_norm") else None
    text = normlib.explain_dispatch(op, x, weight, bias)
    chosen = backends.resolve(op, "auto", x, weight, bias)
    target = f"{chosen.__module__}:{chosen.__name__}"
    assert text.splitlines()[0].endswith(f"runs {target}")
    (line,) = _runs_lines(text)  # exactly one implementation runs
    assert target in line


def test_explain_dispatch_gives_each_refusal_its_rules_reason():
    if not _c_kernels("rms_norm"):
        pytest.skip("the C kernels are not built on this machine")
    text = normlib.explain_dispatch("rms_norm", X.bfloat16(), W8)
    assert "normlib.cpu:rms_norm_c" in text and "refuses this input: the C kernels take weight and bias in the input's dtype" in text
    assert "normlib.cpu:rms_norm_blocked" in _runs_lines(text)[0]


def test_explain_dispatch_reports_the_error_a_call_would_raise():
    if "triton" in normlib.available_backends("rms_norm", CPU):
        text = normlib.explain_dispatch("rms_norm", X.double(), backend="triton")
        assert "raises TypeError: backend='triton' cannot run this input" in text.splitlines()[0]
        assert "refuses this input: the 'triton' kernels compute in float32" in text
    else:
        text = normlib.explain_dispatch("rms_norm", X, backend="triton")
        assert "raises RuntimeError: backend='triton' cannot run rms_norm here" in text.splitlines()[0]
    assert not _runs_lines(text)
    with pytest.raises(ValueError, match="op='softmax' is not one of"):
        normlib.explain_dispatch("softmax", X)
    with pytest.raises(ValueError, match="backend='tpu' is not a known backend"):
        normlib.explain_dispatch("rms_norm", X, backend="tpu")


def test_explain_dispatch_under_a_transform_says_pytorchs_op_runs():
    texts = []
    torch.func.vmap(lambda x: texts.append(normlib.explain_dispatch("rms_norm", x, W8, backend="cpu")) or x)(X)
    assert texts[0].splitlines()[0].endswith("runs normlib.rms_norm:rms_norm_torch")
    assert "takes the input, but a torch.func transform or torch.jit.trace is active" in texts[0]


@pytest.mark.parametrize(
    "triton_version,numpy_version,refused",
    [("3.2.0", "2.4.6", True), ("3.6.0", "2.0.0", True), ("3.6.0", "1.26.4", False),
     ("3.7.0", "2.4.6", False), ("3.9.0+git1234", "2.4.6", False), ("4.0.0", "2.1.0", False)],
)
def test_old_triton_interpreters_beside_numpy_2_are_refused_by_name(triton_version, numpy_version, refused):
    # Measured: Triton 3.2 and 3.6's interpreters fail in the backward kernels under NumPy 2.4 and
    # pass every conformance test under NumPy 1.26; 3.7, 3.8 and 3.9 pass under NumPy 2.4.
    reason = backends.interpreter_reason(triton_version, numpy_version)
    assert (reason is not None) == refused
    if refused:
        assert f"Triton {triton_version}'s interpreter" in reason and "Triton >= 3.7, or NumPy < 2" in reason


def test_the_dispatch_refuses_an_interpreter_that_cannot_run_the_kernels(monkeypatch):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "_CANDIDATES", {})
    monkeypatch.setattr(backends, "_interpreter_checked", [backends.interpreter_reason("3.6.0", "2.4.6")])
    import sys

    if "normlib.kernels._rows" in sys.modules:
        monkeypatch.setattr(sys.modules["normlib.kernels._rows"], "INTERPRETED", True)
    assert "triton" not in normlib.available_backends("rms_norm", CPU)
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run rms_norm here: Triton 3.6.0's interpreter"):
        normlib.rms_norm(X, (8,), backend="triton")
