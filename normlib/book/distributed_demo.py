"""Launching a few processes on this machine and what they run for the "BatchNorm across devices" section.

A notebook cannot hand a function it defines to a spawned process (the child imports its target
by module name), so the workers live here. :func:`launch` starts ``world_size`` processes on
localhost, joins them into a gloo process group, runs one worker in each and returns what each
returned, or raises with a child's traceback; it never waits longer than ``timeout`` seconds.
The tests of :mod:`normlib.distributed` use it too.

Workers are called as ``worker(rank, world_size, *args)`` with the process group initialized;
what they return crosses a process boundary, so it should be plain Python data or NumPy arrays
(torch tensors would travel through shared memory that may vanish when the child exits).
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from normlib.book.data import load_digits
from normlib.book.models import SmallCNN
from normlib.book.train import accuracy, seed_everything
from normlib.distributed import convert_sync_batchnorm


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_rank(rank: int, world_size: int, port: int, backend: str, collective_timeout: float,
              worker: Callable, args: tuple, results) -> None:
    """The body of each spawned process: join the group, run the worker, report, leave the group."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # One thread per process: the processes already share the cores, and a fixed thread count
    # keeps float sums in the same order from run to run.
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=collective_timeout)
        )
        try:
            results.put((rank, "ok", worker(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report everything, including KeyboardInterrupt, to the parent
        results.put((rank, "error", traceback.format_exc()))


def _describe_failures(failures: dict[int, str], results, grace: float = 3.0) -> str:
    """All the tracebacks that arrive within ``grace`` seconds of the first one, in rank order.

    When one worker fails, the others usually fail next with "connection closed by peer" inside
    a collective; the first traceback to arrive is not always the cause, so show them all.
    """
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            rank, status, payload = results.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue_module.Empty:
            break
        if status == "error":
            failures[rank] = payload
    return "\n".join(f"the worker of rank {rank} failed:\n{text}" for rank, text in sorted(failures.items()))


def launch(worker: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
           backend: str = "gloo") -> list[Any]:
    """Run ``worker(rank, world_size, *args)`` in ``world_size`` new processes; return the results
    in rank order.

    Raises RuntimeError with the child's traceback when a worker fails or a process dies, and
    TimeoutError when they are not all done after ``timeout`` seconds; in both cases every child
    still running is terminated, so a hang costs ``timeout`` seconds, not forever.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive (seconds), got {timeout}")
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=_run_rank,
            args=(rank, world_size, port, backend, timeout, worker, args, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    collected: dict[int, Any] = {}
    try:
        while len(collected) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{world_size - len(collected)} of {world_size} processes did not finish within "
                    f"timeout={timeout} s (ranks done: {sorted(collected)})"
                )
            try:
                rank, status, payload = results.get(timeout=min(remaining, 0.5))
            except queue_module.Empty:
                dead = [r for r, p in enumerate(processes)
                        if r not in collected and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"process of rank {dead[0]} died with exit code {processes[dead[0]].exitcode} "
                        f"before reporting a result"
                    ) from None
                continue
            if status == "error":
                raise RuntimeError(_describe_failures({rank: payload}, results))
            collected[rank] = payload
        for process in processes:
            process.join(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        results.close()
    return [collected[rank] for rank in range(world_size)]


# ----------------------------------------------------------------------------------------------
# Workers for the book
# ----------------------------------------------------------------------------------------------


def check_against_batch_norm(rank: int, world_size: int, sizes: list[int], seed: int) -> dict[str, float]:
    """Rank r normalizes ``sizes[r]`` samples with normlib.SyncBatchNorm; every rank also runs
    torch.nn.BatchNorm2d on the concatenation of all ranks' samples. Returns the largest absolute
    differences (output, input gradient, parameter gradients, running statistics), in float64."""
    channels = 3
    generator = torch.Generator().manual_seed(seed)
    # Every rank draws the whole batch from the same seed and keeps its slice: no data to send.
    x_all = torch.randn(sum(sizes), channels, 4, 4, generator=generator, dtype=torch.float64) * 3 + 1
    dy_all = torch.randn(x_all.shape, generator=generator, dtype=torch.float64)
    start = sum(sizes[:rank])
    x = x_all[start : start + sizes[rank]].clone().requires_grad_()

    sync_bn = convert_sync_batchnorm(nn.BatchNorm2d(channels, dtype=torch.float64))
    single = nn.BatchNorm2d(channels, dtype=torch.float64)
    y = sync_bn(x)
    (y * dy_all[start : start + sizes[rank]]).sum().backward()
    x_ref = x_all.clone().requires_grad_()
    y_ref = single(x_ref)
    (y_ref * dy_all).sum().backward()

    # Parameter gradients are per process: their sum over processes is the single-process one.
    grads = torch.cat([sync_bn.weight.grad, sync_bn.bias.grad])
    dist.all_reduce(grads)
    ref_grads = torch.cat([single.weight.grad, single.bias.grad])
    end = start + sizes[rank]
    return {
        "output": (y - y_ref[start:end]).abs().max().item() if sizes[rank] else 0.0,
        "input gradient": (x.grad - x_ref.grad[start:end]).abs().max().item() if sizes[rank] else 0.0,
        "weight and bias gradients": (grads - ref_grads).abs().max().item(),
        "running mean": (sync_bn.running_mean - single.running_mean).abs().max().item(),
        "running var": (sync_bn.running_var - single.running_var).abs().max().item(),
    }


def _average_gradients(model: nn.Module, world_size: int) -> None:
    """What DistributedDataParallel does after backward: every process gets the mean gradient.

    All gradients travel in one flat buffer, as DDP's buckets do: one collective per step instead
    of one per parameter, since for a small model the cost of a collective is its latency.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (number of parameters,)
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def train_digits(rank: int, world_size: int, variants: list[str], per_rank_batch: int, epochs: int,
                 lr: float, seeds: list[int]) -> dict[str, dict[str, list]]:
    """Data-parallel training of SmallCNN on digits, once per variant ("plain" or "sync" BN) and seed.

    Each step takes the next ``per_rank_batch * world_size`` shuffled samples and gives rank r its
    r-th slice; gradients are averaged across ranks, so the only difference between the variants
    is which samples each BatchNorm's statistics come from. Rank 0 evaluates (with its running
    statistics, as DDP's default of broadcasting rank 0's buffers would) after each epoch.
    Returns, per variant, the test accuracy per epoch for each seed (rank 0; empty lists on the
    other ranks) and the median seconds per step over all of this rank's steps.
    """
    data = load_digits()
    global_batch = per_rank_batch * world_size
    n = len(data.y_train)
    loss_fn = nn.CrossEntropyLoss()
    report: dict[str, dict[str, list]] = {}
    for variant in variants:
        if variant not in ("plain", "sync"):
            raise ValueError(f"variants must be 'plain' or 'sync', got {variant!r}")
        accuracies, step_seconds = [], []
        for seed in seeds:
            # Same seed on every rank: identical initial weights, as DDP's initial broadcast gives.
            seed_everything(seed)
            model = SmallCNN(norm="batch")
            if variant == "sync":
                model = convert_sync_batchnorm(model)
            optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
            order_generator = torch.Generator().manual_seed(seed)  # same data order on every rank
            seed_everything(seed + rank)  # anything random beyond this point is per rank
            per_epoch = []
            for _ in range(epochs):
                model.train()
                order = torch.randperm(n, generator=order_generator)
                for start in range(0, n - global_batch + 1, global_batch):
                    mine = order[start + rank * per_rank_batch : start + (rank + 1) * per_rank_batch]
                    began = time.perf_counter()
                    loss = loss_fn(model(data.x_train[mine]), data.y_train[mine])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    _average_gradients(model, world_size)
                    optimizer.step()
                    step_seconds.append(time.perf_counter() - began)
                if rank == 0:
                    per_epoch.append(accuracy(model, data.x_test, data.y_test))
                dist.barrier()  # the other ranks wait while rank 0 evaluates
            accuracies.append(per_epoch)
        report[variant] = {"accuracy": accuracies, "step_seconds": float(np.median(step_seconds))}
    return report
