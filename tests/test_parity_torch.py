"""normlib against PyTorch on PyTorch's own test samples.

PyTorch tests its norms with the OpInfo entries of ``torch.testing._internal`` (``op_db``: sample,
reference and error inputs per op) and the ModuleInfo entries (``module_db``: constructor and
forward inputs per module). Every such sample of the norms normlib has a twin of runs here through
normlib and torch side by side, on every backend ``available_backends`` lists for the CPU (the
Triton one through its interpreter, which tests/conftest.py switches on):

* ops: outputs per dtype the OpInfo lists, gradients in float64 (float32 on "triton", whose
  kernels compute in float32), running statistics after the call, and every error input raising;
* modules: torch's module with random parameters and statistics, its state copied into normlib's
  twin with ``load_state_dict(strict=True)``; two steps in train mode, then two in eval mode,
  comparing outputs, input and parameter gradients (float64), ``running_mean``, ``running_var``
  and ``num_batches_tracked`` after each step.

A sample normlib refuses is not skipped: :data:`REFUSALS` names each documented difference, the
test predicts which samples it covers, checks that exactly those raise the documented error, and
prints one table of every case. What runs where is chosen to keep the file near a minute on two
cores: each backend sees every sample, the interpreted Triton kernels in float32 and bfloat16 only.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from torch import nn

# torch's test internals import expecttest (pinned in requirements.txt): without it this fails
from torch.testing._internal import common_methods_invocations, common_modules

import normlib
from normlib.backends import TRITON_DTYPES

CPU = torch.device("cpu")

# The documented differences, as (error, what its message says, why): a sample that falls under
# one must raise that error, every other sample must match torch.
REFUSALS = {
    "negative eps": (
        ValueError,
        "eps must be a non-negative number",
        "eps < 0 is a ValueError in normlib (a deliberate difference: torch computes with it and "
        "returns NaN for rows whose variance is below -eps)",
    ),
    "triton dtype": (
        TypeError,
        "backend='triton' cannot run this input",
        "backend='triton' computes in float32, so it refuses float64 and complex input instead of "
        "returning float32 precision in a float64 tensor (backend='auto' sends them to torch)",
    ),
}


def _tolerance(dtype: torch.dtype, backend: str) -> dict[str, float]:
    """Per dtype: float64 to rounding, float32 allowing a different summation order, and the
    half-precision types a unit or two in the last place (a fused kernel rounds once)."""
    if dtype in (torch.float64, torch.complex128):
        return {"rtol": 1e-9, "atol": 1e-9}
    if dtype in (torch.float32, torch.complex64):
        return {"rtol": 1e-4, "atol": 1e-4} if backend == "triton" else {"rtol": 2e-5, "atol": 2e-5}
    if dtype == torch.float16:
        return {"rtol": 2e-3, "atol": 2e-3}
    return {"rtol": 1.6e-2, "atol": 1.6e-2}  # bfloat16


def _gradient_tolerance(dtype: torch.dtype, backend: str) -> dict[str, float]:
    """As :func:`_tolerance`, but float32 gradients get an absolute 1e-3: torch's samples include
    rows of one element with eps=1e-5, where x_hat is 0 up to the rounding of the mean and the
    weight's gradient is that rounding times rstd = 1/sqrt(eps) ~ 316 (torch itself gives 8e-5
    where the exact answer is 0)."""
    if dtype == torch.float32:
        return {"rtol": 1e-4, "atol": 1e-3}
    return _tolerance(dtype, backend)


def _gradient_dtype(backend: str) -> torch.dtype:
    return torch.float32 if backend == "triton" else torch.float64


def _dtypes(supported: set[torch.dtype], backend: str) -> list[torch.dtype]:
    """Every dtype torch's entry lists; on the interpreted Triton kernels float32 and bfloat16 for
    the comparison plus one refused dtype (float64) to check the refusal."""
    ordered = sorted(supported, key=str)
    if backend == "triton":
        return [d for d in ordered if d in (torch.float32, torch.bfloat16, torch.float64)]
    return ordered


# ----------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpCase:
    opinfo_name: str  # the op_db entry
    normlib_op: str  # the name in normlib.backends.IMPLEMENTATIONS
    call: object  # (sample input, args, kwargs, backend) -> normlib's output
    torch_output: object = None  # torch's output -> the part normlib's op returns
    note: str = ""


OP_CASES = [
    OpCase("nn.functional.layer_norm", "layer_norm", lambda x, a, k, b: normlib.layer_norm(x, *a, **k, backend=b)),
    OpCase(
        "native_layer_norm",
        "layer_norm",
        lambda x, a, k, b: normlib.layer_norm(x, *a, **k, backend=b),
        torch_output=lambda out: out[0],
        note="normlib.layer_norm returns the output; torch's mean and rstd have no normlib twin",
    ),
    OpCase("nn.functional.rms_norm", "rms_norm", lambda x, a, k, b: normlib.rms_norm(x, *a, **k, backend=b)),
    OpCase("nn.functional.group_norm", "group_norm", lambda x, a, k, b: normlib.group_norm(x, *a, **k, backend=b)),
    OpCase("nn.functional.batch_norm", "batch_norm", lambda x, a, k, b: normlib.batch_norm(x, *a, **k, backend=b)),
    OpCase(
        "nn.functional.instance_norm",
        "instance_norm",
        lambda x, a, k, b: normlib.instance_norm(x, *a, **k, backend=b),
    ),
]

_NORMLIB_FUNCTIONS = {
    "layer_norm": normlib.layer_norm,
    "rms_norm": normlib.rms_norm,
    "group_norm": normlib.group_norm,
    "batch_norm": normlib.batch_norm,
    "instance_norm": normlib.instance_norm,
}


def _opinfo(name: str):
    matches = [op for op in common_methods_invocations.op_db if op.name == name and op.variant_test_name == ""]
    assert len(matches) == 1, f"torch's op_db has no single entry {name!r}"
    return matches[0]


def _clone(value):
    """A fresh leaf with the same values (and requires_grad), so each side gets its own copy."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _leaves(*values) -> list[torch.Tensor]:
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            if value.requires_grad:
                found.append(value)
        elif isinstance(value, (list, tuple)):
            found += _leaves(*value)
        elif isinstance(value, dict):
            found += _leaves(*value.values())
    return found


def _predicted_refusal(case: OpCase, backend: str, dtype: torch.dtype, sample) -> str | None:
    # in the order the public op checks: its arguments first, then the backend
    function = _NORMLIB_FUNCTIONS[case.normlib_op]
    bound = inspect.signature(function).bind(sample.input, *sample.args, **sample.kwargs).arguments
    eps = bound.get("eps")
    if eps is not None and eps < 0:
        return "negative eps"
    if backend == "triton" and dtype not in TRITON_DTYPES:
        return "triton dtype"
    return None


def _run_op_sample(case: OpCase, backend: str, dtype: torch.dtype, sample, rows: list) -> None:
    """Compare one sample; append ``(outcome, detail)`` to ``rows``."""
    refusal = _predicted_refusal(case, backend, dtype, sample)
    ours_in = (_clone(sample.input), _clone(sample.args), _clone(sample.kwargs))
    theirs_in = (_clone(sample.input), _clone(sample.args), _clone(sample.kwargs))
    if refusal is not None:
        error_type, message, _ = REFUSALS[refusal]
        with pytest.raises(error_type, match=message):
            case.call(*ours_in, backend)
        rows.append(("refused", refusal))
        return
    ours = case.call(*ours_in, backend)
    theirs = _torch_call(case, *theirs_in)
    tolerance = _tolerance(dtype, backend)
    context = f"{case.opinfo_name} backend={backend} dtype={dtype} input {tuple(sample.input.shape)}"
    torch.testing.assert_close(ours, theirs, **tolerance, equal_nan=True, msg=lambda m: f"{context}: {m}")
    # running statistics updated in place (batch_norm, instance_norm): args/kwargs hold them
    for mine, torchs in zip(_tensors(ours_in[1:]), _tensors(theirs_in[1:])):
        torch.testing.assert_close(mine, torchs, **tolerance, msg=lambda m: f"{context} (running stats): {m}")
    if dtype == _gradient_dtype(backend) or (dtype == torch.complex128 and backend != "triton"):
        our_leaves, their_leaves = _leaves(*ours_in), _leaves(*theirs_in)
        if our_leaves and ours.requires_grad:
            grad_output = torch.randn(ours.shape, dtype=ours.dtype, generator=torch.Generator().manual_seed(0))
            our_grads = torch.autograd.grad(ours, our_leaves, grad_output, allow_unused=True)
            their_grads = torch.autograd.grad(theirs, their_leaves, grad_output, allow_unused=True)
            for mine, torchs in zip(our_grads, their_grads):
                if torchs is None:
                    assert mine is None or not mine.any(), f"{context}: a gradient torch does not have"
                    continue
                torch.testing.assert_close(
                    mine, torchs, **_gradient_tolerance(dtype, backend), msg=lambda m: f"{context} (gradient): {m}"
                )
            rows.append(("matched, with gradients", case.note))
            return
    rows.append(("matched", case.note))


def _tensors(values) -> list[torch.Tensor]:
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found += _tensors(value)
        elif isinstance(value, dict):
            found += _tensors(value.values())
    return found


def _torch_call(case: OpCase, input, args, kwargs):
    output = _opinfo(case.opinfo_name).op(input, *args, **kwargs)
    return case.torch_output(output) if case.torch_output is not None else output


def _print_table(title: str, rows: list[tuple[str, str, str, str]]) -> None:
    counts = Counter((backend, dtype, outcome, detail) for backend, dtype, outcome, detail in rows)
    print(f"\n{title}: {len(rows)} cases")
    for (backend, dtype, outcome, detail), count in sorted(counts.items()):
        print(f"  {backend:7s} {dtype:11s} {count:4d} {outcome}" + (f" ({detail})" if detail else ""))
    for name in sorted({detail for *_, detail in rows if detail in REFUSALS}):
        print(f"  {name}: {REFUSALS[name][2]}")


@pytest.mark.parametrize("case", OP_CASES, ids=[c.opinfo_name for c in OP_CASES])
def test_op_matches_torch_on_torch_samples(case: OpCase):
    opinfo = _opinfo(case.opinfo_name)
    table = []
    for backend in normlib.available_backends(case.normlib_op, CPU):
        for dtype in _dtypes(set(opinfo.supported_dtypes("cpu")), backend):
            rows: list = []
            samples = opinfo.reference_inputs("cpu", dtype, requires_grad=dtype.is_floating_point or dtype.is_complex)
            for sample in samples:
                _run_op_sample(case, backend, dtype, sample, rows)
            assert rows, f"{case.opinfo_name}: no samples for {dtype}"
            table += [(backend, str(dtype).removeprefix("torch."), outcome, detail) for outcome, detail in rows]
    _print_table(case.opinfo_name, table)
    assert any(outcome.startswith("matched, with gradients") for _, _, outcome, _ in table)


ERROR_CASES = [c for c in OP_CASES if _opinfo(c.opinfo_name).error_inputs_func is not None]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c.opinfo_name for c in ERROR_CASES])
def test_op_raises_on_torch_error_inputs(case: OpCase):
    """Every input torch rejects, normlib rejects too, with an error of its own convention
    (TypeError for a wrong type, ValueError for a wrong shape or value) that names the problem.
    (torch's layer_norm, batch_norm and instance_norm entries have no error inputs.)"""
    opinfo = _opinfo(case.opinfo_name)
    errors = list(opinfo.error_inputs("cpu"))
    assert errors
    for error in errors:
        sample = error.sample_input
        with pytest.raises(error.error_type, match=error.error_regex):
            _torch_call(case, sample.input, sample.args, sample.kwargs)
        for backend in normlib.available_backends(case.normlib_op, CPU):
            with pytest.raises((ValueError, TypeError)) as raised:
                case.call(sample.input, sample.args, sample.kwargs, backend)
            assert len(str(raised.value)) > 20, f"an unhelpful message: {raised.value!r}"


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

MODULE_TWINS: dict[type[nn.Module], tuple[type[nn.Module], str]] = {
    nn.LayerNorm: (normlib.LayerNorm, "layer_norm"),
    nn.RMSNorm: (normlib.RMSNorm, "rms_norm"),
    nn.GroupNorm: (normlib.GroupNorm, "group_norm"),
    nn.BatchNorm1d: (normlib.BatchNorm1d, "batch_norm"),
    nn.BatchNorm2d: (normlib.BatchNorm2d, "batch_norm"),
    nn.BatchNorm3d: (normlib.BatchNorm3d, "batch_norm"),
    nn.InstanceNorm1d: (normlib.InstanceNorm1d, "instance_norm"),
    nn.InstanceNorm2d: (normlib.InstanceNorm2d, "instance_norm"),
    nn.InstanceNorm3d: (normlib.InstanceNorm3d, "instance_norm"),
}


def _moduleinfo(cls: type[nn.Module]):
    matches = [m for m in common_modules.module_db if m.module_cls is cls]
    assert len(matches) == 1, f"torch's module_db has no single entry for {cls.__name__}"
    return matches[0]


def _randomize(module: nn.Module, generator: torch.Generator) -> None:
    """Parameters and running statistics away from their initial values, so that copying the
    state is what makes the two modules agree."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.rand(parameter.shape, generator=generator, dtype=parameter.dtype) + 0.5)
        for name, buffer in module.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator, dtype=buffer.dtype))
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator, dtype=buffer.dtype) + 0.5)
            elif name.endswith("num_batches_tracked"):
                buffer.fill_(3)


def _compare_module_step(ours, theirs, forward_args, dtype, backend, context) -> None:
    our_args, their_args = _clone(forward_args), _clone(forward_args)
    tolerance = _tolerance(dtype, backend)
    our_out, their_out = ours(*our_args), theirs(*their_args)
    torch.testing.assert_close(our_out, their_out, **tolerance, msg=lambda m: f"{context} (output): {m}")
    our_leaves = _leaves(our_args) + [p for p in ours.parameters()]
    their_leaves = _leaves(their_args) + [p for p in theirs.parameters()]
    if our_out.requires_grad:
        grad_output = torch.randn(our_out.shape, dtype=our_out.dtype, generator=torch.Generator().manual_seed(1))
        our_grads = torch.autograd.grad(our_out, our_leaves, grad_output, allow_unused=True)
        their_grads = torch.autograd.grad(their_out, their_leaves, grad_output, allow_unused=True)
        for mine, torchs in zip(our_grads, their_grads):
            if torchs is None:
                assert mine is None, f"{context}: a gradient torch does not have"
            else:
                torch.testing.assert_close(
                    mine, torchs, **_gradient_tolerance(dtype, backend), msg=lambda m: f"{context} (gradient): {m}"
                )
    our_buffers, their_buffers = dict(ours.named_buffers()), dict(theirs.named_buffers())
    assert our_buffers.keys() == their_buffers.keys(), context
    for name, buffer in their_buffers.items():
        torch.testing.assert_close(our_buffers[name], buffer, **tolerance, msg=lambda m: f"{context} ({name}): {m}")


@pytest.mark.parametrize("torch_cls", list(MODULE_TWINS), ids=[c.__name__ for c in MODULE_TWINS])
def test_module_matches_torch_on_torch_samples(torch_cls: type[nn.Module]):
    normlib_cls, op = MODULE_TWINS[torch_cls]
    info = _moduleinfo(torch_cls)
    generator = torch.Generator().manual_seed(0)
    table = []
    for backend in normlib.available_backends(op, CPU):
        dtype = _gradient_dtype(backend)
        for training in (True, False):
            inputs = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training)
            for index, module_input in enumerate(inputs):
                args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
                theirs = torch_cls(*args, **kwargs).to(dtype)
                ours = normlib_cls(*args, **kwargs, backend=backend).to(dtype)
                _randomize(theirs, generator)
                ours.load_state_dict(theirs.state_dict(), strict=True)
                for mode in ("train", "eval"):
                    ours.train(mode == "train")
                    theirs.train(mode == "train")
                    for step in range(2):
                        context = (
                            f"{torch_cls.__name__}(*{args}, **{kwargs}) backend={backend} {mode} step {step} "
                            f"input {index}"
                        )
                        _compare_module_step(ours, theirs, module_input.forward_input.args, dtype, backend, context)
                table.append((backend, str(dtype).removeprefix("torch."), "matched (train and eval, 2 steps each)", ""))
    _print_table(torch_cls.__name__, table)
    assert table


@pytest.mark.parametrize(
    "torch_cls",
    [c for c in MODULE_TWINS if _moduleinfo(c).module_error_inputs_func is not None],
    ids=lambda c: c.__name__,
)
def test_module_raises_on_torch_error_inputs(torch_cls: type[nn.Module]):
    normlib_cls, op = MODULE_TWINS[torch_cls]
    info = _moduleinfo(torch_cls)
    errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=False, training=True)
    assert errors
    for error in errors:
        module_input = error.module_error_input
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        with pytest.raises((ValueError, TypeError)) as raised:
            normlib_cls(*args, **kwargs)(*module_input.forward_input.args)
        assert len(str(raised.value)) > 20, f"an unhelpful message: {raised.value!r}"
