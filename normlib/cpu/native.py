"""Builds and loads the fused C kernels as Python extensions and calls them on tensors.

``rms_norm.c`` (RMSNorm, with or without the residual add) and ``layer_norm.c`` (residual add +
LayerNorm) share ``_kernels.h``. Each is compiled with the system C compiler the first time its op
is used, into a cache directory keyed by everything the binary depends on (the sources, the
flags, the compiler, the CPU, the Python version, the OpenMP runtime), and imported as
``_rms_norm`` or ``_layer_norm``. A first build takes about a second and a cached load a few
milliseconds, while torch.compile and numba take several seconds per kernel, too long for a
notebook's first call (``results/cpu/native_build_and_threads.json`` has the measurements).
Without a C compiler or Python's C headers, :func:`extension` returns None with a reason, and the
callers use the pure-PyTorch fallbacks.

Where. Anyone can compute the cache key, and loading a library runs its code in this process, so
libraries are loaded and built only in a directory of the user's own that nobody else can write:
the cache directory (``NORMLIB_CACHE_DIR``, else ``~/.cache/normlib``), else, where that cannot be
written or is refused, ``<tempdir>/normlib-<uid>``, created with mode 0700. Only files of the
user's own that nobody else can write are loaded; any other file, and a library that does not load
(empty, truncated, for another CPU), is rebuilt once, atomically. With no usable directory the
pure-PyTorch fallbacks run, and a warning says which directory was refused and why.

Threads. With OpenMP, the kernels run in PyTorch's own thread pool: the extension is linked
against the very OpenMP runtime file PyTorch has loaded (found in /proc/self/maps), so the
dynamic loader hands it the copy already in memory instead of a second runtime whose threads
would compete with PyTorch's. Where that is impossible it is built with pthreads, started per
call. The GIL is released while large tensors are processed.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import stat
import struct
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

SOURCE_DIR = Path(__file__).parent
HEADER = SOURCE_DIR / "_kernels.h"
KERNELS = ("rms_norm", "layer_norm")  # SOURCE_DIR/<name>.c -> the extension module _<name>
# -march=native: the build is for this CPU only (the cache key includes the CPU's flags);
# no -ffast-math, so NaN and infinity propagate as in PyTorch.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC"]
# With OpenMP: parallel regions in PyTorch's pool. Without: `omp simd` pragmas only, pthreads.
OPENMP_FLAGS = ["-fopenmp"]
PTHREAD_FLAGS = ["-fopenmp-simd", "-pthread"]

STORAGE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# Elements per thread, by storage type: a second thread pays off only once each has this many,
# because an OpenMP parallel region costs about as much as a small row block; bfloat16 and float16
# convert every element, which keeps them compute-bound longer. Measured one vs two threads:
# results/cpu/native_build_and_threads.json.
_ELEMENTS_PER_THREAD = {torch.float32: 1 << 15, torch.bfloat16: 1 << 13, torch.float16: 1 << 13}


def _cpu_signature() -> str:
    """The CPU's feature flags: a -march=native build must not be reused on another CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("NORMLIB_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "normlib"
    )
    return Path(root)


def _library_dirs() -> tuple[Path, Path]:
    """Where libraries are loaded from and built, in order: the cache directory, then a private
    directory in the temporary directory, for a cache that cannot be written (a read-only home)
    or that :func:`_why_unsafe` refuses."""
    return _cache_dir(), Path(tempfile.gettempdir()) / f"normlib-{os.getuid()}"


def torch_openmp_runtime() -> str | None:
    """The path of the GNU OpenMP runtime (libgomp) this process has loaded with PyTorch, or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if os.path.basename(path).startswith("libgomp") and ".so" in path:
                    return path
    except OSError:
        pass
    return None


# A library is executed inside this process as soon as it is loaded, so it is loaded only from where
# no other user could have put it: a directory of this user's own that nobody else can write,
# reached through directories that belong to this user or to root (who can write anywhere anyway)
# and that nobody else can write either, or that are sticky (/tmp): there others may add entries
# but can neither rename nor remove ours. Group-writable counts as writable by others, since normlib
# cannot tell who is in the group. The rule holds for root too: a directory of mode 0777, or one
# owned by another uid, is refused.
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
_ADVICE = "Set NORMLIB_CACHE_DIR to a directory of your own that only you can write (chmod go-w)."


def _why_unsafe(directory: Path) -> str | None:
    """Why the existing ``directory`` must not hold libraries this process loads, or None if it may."""
    uid = os.getuid()
    leaf = Path(os.path.realpath(directory))
    # The directories as named (whoever can write one could swap a link in it) and as resolved.
    for path in dict.fromkeys([leaf, *leaf.parents, *Path(os.path.abspath(directory)).parents]):
        info = os.stat(path)
        mode = f"mode {stat.S_IMODE(info.st_mode):o}"
        if path == leaf and not stat.S_ISDIR(info.st_mode):
            return f"{path} is not a directory"
        if path == leaf and info.st_uid != uid:
            return f"{path} belongs to uid {info.st_uid}, not to this user (uid {uid})"
        if path == leaf and info.st_mode & _WRITABLE_BY_OTHERS:
            return f"{path} is writable by other users ({mode})"
        if info.st_uid not in (uid, 0):
            return f"{path}, above {leaf}, belongs to uid {info.st_uid}"
        if info.st_mode & _WRITABLE_BY_OTHERS and not info.st_mode & stat.S_ISVTX:
            return f"{path}, above {leaf}, is writable by other users ({mode}, not sticky)"
    return None


def _make_private_dirs(directory: Path) -> None:
    """Creates ``directory`` and its missing parents, each with mode 0700; raises OSError."""
    missing = []
    path = Path(os.path.abspath(directory))
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # created meanwhile by someone else: _why_unsafe judges it like any existing one


def _is_own_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (not a link) of this user's that nobody else can write."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & _WRITABLE_BY_OTHERS


def _is_whole_library(path: Path) -> bool:
    """Whether ``path`` is an ELF file as long as its headers say. A truncated library can pass
    dlopen and then crash the process (SIGBUS) when a page past the end of the file is touched."""
    data = path.read_bytes()
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return False
    wide, order = data[4] == 2, "<" if data[5] == 1 else ">"  # EI_CLASS 2: 64-bit; EI_DATA 1: little-endian
    word = order + ("Q" if wide else "I")
    # The ELF header's e_phoff and e_shoff, then (after e_flags and e_ehsize) the tables' entry sizes and counts
    phoff, shoff = struct.unpack_from(order + ("QQ" if wide else "II"), data, 0x20 if wide else 0x1C)
    phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", data, 0x36 if wide else 0x2A)
    if phentsize < (0x38 if wide else 0x20) or phoff + phentsize * phnum > len(data):
        return False
    ends = [shoff + shentsize * shnum]
    for header in range(phoff, phoff + phentsize * phnum, phentsize):
        # p_offset and p_filesz: the bytes a segment maps from the file
        offset = struct.unpack_from(word, data, header + (0x08 if wide else 0x04))[0]
        size = struct.unpack_from(word, data, header + (0x20 if wide else 0x10))[0]
        ends.append(offset + size)
    return max(ends) <= len(data)


def _compile(compiler: str, source: Path, include: str, openmp_runtime: str | None, target: Path) -> None:
    """Compiles into a temporary file first, then renames: concurrent processes never load a
    half-written library. Tries the OpenMP build first, then the pthreads one."""
    common = [*FLAGS, f"-I{include}", f"-I{SOURCE_DIR}"]
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial, obj = Path(scratch) / target.name, Path(scratch) / f"{source.stem}.o"
        run = lambda command: subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)  # noqa: E731
        try:
            if openmp_runtime is None:
                raise subprocess.CalledProcessError(1, "openmp", stderr="PyTorch loaded no libgomp")
            # Two steps: linking with -fopenmp would add the compiler's own -lgomp; instead the
            # library names PyTorch's runtime file, whose soname the loader finds already loaded.
            run([compiler, *common, *OPENMP_FLAGS, "-c", str(source), "-o", str(obj)])
            run([compiler, "-shared", str(obj), openmp_runtime, "-o", str(partial), "-lm"])
        except subprocess.CalledProcessError:
            run([compiler, *common, *PTHREAD_FLAGS, "-shared", str(source), "-o", str(partial), "-lm"])
        os.chmod(partial, 0o755)  # the linker honours the umask; a group-writable file would be refused
        os.replace(partial, target)


def _import(name: str, path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(f"normlib.cpu._{name}", str(path))
    spec = importlib.util.spec_from_file_location(f"normlib.cpu._{name}", str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _load_or_build(name: str, target: Path, build: Callable[[Path], None]) -> ModuleType:
    """Imports the library ``target``, building it first where there is none, where the file is
    not this user's own or where it is truncated. One that does not load (empty, for another CPU)
    is rebuilt once; if the rebuilt one fails too, the ImportError propagates."""
    if _is_own_file(target) and _is_whole_library(target):
        try:
            return _import(name, target)
        except ImportError:
            pass
    build(target)
    return _import(name, target)


_why_unavailable: dict[str, str] = {}
# The loaded modules by name, for the per-call paths below: a dict lookup costs a third of a
# call through functools.cache, and on small tensors the whole op takes a few microseconds.
_loaded: dict[str, ModuleType] = {}
_warned = False  # refused directories are reported once per process, not once per kernel


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@cache
def extension(name: str = "rms_norm") -> ModuleType | None:
    """The compiled kernels ``name`` (one of KERNELS), or None (:func:`unavailable_reason` says why)."""
    source = SOURCE_DIR / f"{name}.c"
    if sys.platform == "win32":
        _why_unavailable[name] = "the fused C kernels are built with a POSIX C compiler (not on Windows)"
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not source.exists():
        _why_unavailable[name] = f"no C compiler found (tried $CC, cc, gcc) or {source.name} is missing"
        return None
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        _why_unavailable[name] = (
            f"Python's C headers are missing (no Python.h in {include}); "
            f"install them, e.g. apt install python3-dev"
        )
        return None
    passed_over: list[str] = []  # why each directory tried before was not used
    refused = False  # one others could write: a warning says so (a read-only cache needs no word)
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        openmp_runtime = torch_openmp_runtime()
        key = hashlib.sha256(
            "\0".join([
                source.read_text(), HEADER.read_text(), " ".join(FLAGS + OPENMP_FLAGS + PTHREAD_FLAGS),
                version, _cpu_signature(), sys.version, include, str(openmp_runtime),
            ]).encode()
        ).hexdigest()[:16]
        build = partial(_compile, compiler, source, include, openmp_runtime)
        for directory in _library_dirs():
            try:
                _make_private_dirs(directory)
                why_unsafe = _why_unsafe(directory)
                if why_unsafe is not None:
                    passed_over.append(why_unsafe)
                    refused = True
                    continue
                module = _loaded[name] = _load_or_build(name, directory / f"{name}_{key}.so", build)
            except OSError as error:
                passed_over.append(f"{directory} cannot be used ({error.strerror or error})")
                continue
            if refused:
                _warn_once(f"normlib keeps its C kernels in {directory}, since {'; '.join(passed_over)}. {_ADVICE}")
            return module
    except (OSError, ImportError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        _why_unavailable[name] = f"building {source.name} failed: {detail.strip()[:500]}"
        return None
    _why_unavailable[name] = (
        f"no directory to build the C kernels in could be used: {'; '.join(passed_over)}. {_ADVICE}"
    )
    if refused:
        _warn_once(f"normlib uses its plain-PyTorch CPU path: {_why_unavailable[name]}")
    return None


def unavailable_reason(name: str = "rms_norm") -> str | None:
    """None when the kernels ``name`` are built and loaded, else why not."""
    extension(name)
    return _why_unavailable.get(name)


@cache
def supports(dtype: torch.dtype, name: str = "rms_norm") -> bool:
    """Whether the C kernels ``name`` can store ``dtype`` (float16 only with a compiler that has _Float16)."""
    module = extension(name)
    if module is None or dtype not in STORAGE_CODES:
        return False
    return dtype != torch.float16 or module.has_float16()


def _threads(elements: int, dtype: torch.dtype) -> int:
    per_thread = _ELEMENTS_PER_THREAD[dtype]
    if elements < 2 * per_thread:
        return 1
    return min(torch.get_num_threads(), elements // per_thread)


# The functions below run only after supports(dtype, name) said yes, so the module is loaded.
# The kernels take their arguments by name (the fields of row_norm_args_t in _kernels.h): tensors
# as the addresses of their data, 0 for a tensor an op does without.


def _pointer(tensor: Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def rms_norm(x: Tensor, gamma: Tensor, eps: float) -> Tensor:
    """y = rms_norm(x) for contiguous (rows, n) x and (n,) gamma of x's dtype: the common case,
    with nothing else to do (on one row, every line of Python costs a few percent of the op)."""
    rows, n = x.shape
    y = torch.empty_like(x)
    _loaded["rms_norm"].forward(
        storage=STORAGE_CODES[x.dtype], x=x.data_ptr(), gamma=gamma.data_ptr(), y=y.data_ptr(),
        rows=rows, n=n, eps=eps, threads=_threads(rows * n, x.dtype),
    )
    return y


def rms_norm_forward(
    x: Tensor,  # (rows, n) contiguous, float32/bfloat16/float16
    residual: Tensor | None,  # (rows, n) contiguous, x's dtype, or None
    gamma: Tensor,  # (n,) contiguous, x's dtype
    eps: float,
) -> tuple[Tensor, Tensor | None]:
    """Returns ``(y, h)`` in x's dtype, h None without a residual. Nothing is saved for the
    backward but what was normalized (x, or h): it recomputes rstd from it."""
    rows, n = x.shape
    y = torch.empty_like(x)
    h = None if residual is None else torch.empty_like(x)
    _loaded["rms_norm"].forward(
        storage=STORAGE_CODES[x.dtype], x=x.data_ptr(), residual=_pointer(residual), h=_pointer(h),
        gamma=gamma.data_ptr(), y=y.data_ptr(), rows=rows, n=n, eps=eps, threads=_threads(rows * n, x.dtype),
    )
    return y, h


def rms_norm_backward(
    dy: Tensor,  # (rows, n) contiguous, x's dtype
    dh: Tensor | None,  # (rows, n) contiguous or None
    x: Tensor,  # (rows, n) contiguous: what was normalized
    gamma: Tensor,  # (n,) contiguous, x's dtype
    eps: float,
    needs_dx: bool,
    needs_dgamma: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Returns ``(dx, dgamma)`` in x's dtype (None where not needed); dgamma is summed in float32."""
    rows, n = x.shape
    dx = torch.empty_like(x) if needs_dx else None
    dgamma = torch.empty_like(gamma) if needs_dgamma else None
    _loaded["rms_norm"].backward(
        storage=STORAGE_CODES[x.dtype], dy=dy.data_ptr(), dh=_pointer(dh), x=x.data_ptr(),
        gamma=gamma.data_ptr(), dx=_pointer(dx), dgamma=_pointer(dgamma),
        rows=rows, n=n, eps=eps, threads=_threads(rows * n, x.dtype),
    )
    return dx, dgamma


def add_layer_norm_forward(
    x: Tensor,  # (rows, n) contiguous, float32/bfloat16/float16
    residual: Tensor,  # (rows, n) contiguous, x's dtype
    gamma: Tensor,  # (n,) contiguous, x's dtype
    beta: Tensor,  # (n,) contiguous, x's dtype
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Returns ``(y, h)`` in x's dtype; the backward recomputes mean and rstd from h."""
    rows, n = x.shape
    y, h = torch.empty_like(x), torch.empty_like(x)
    _loaded["layer_norm"].forward(
        storage=STORAGE_CODES[x.dtype], x=x.data_ptr(), residual=residual.data_ptr(), h=h.data_ptr(),
        gamma=gamma.data_ptr(), beta=beta.data_ptr(), y=y.data_ptr(),
        rows=rows, n=n, eps=eps, threads=_threads(rows * n, x.dtype),
    )
    return y, h


def add_layer_norm_backward(
    dy: Tensor,  # (rows, n) contiguous, h's dtype
    dh: Tensor | None,  # (rows, n) contiguous or None
    h: Tensor,  # (rows, n) contiguous: what was normalized
    gamma: Tensor,  # (n,) contiguous, h's dtype
    eps: float,
    needs_dx: bool,
    needs_parameters: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Returns ``(dx, dgamma, dbeta)`` in h's dtype (dgamma and dbeta both or neither), dx
    including dh; the parameter gradients are summed in float32."""
    rows, n = h.shape
    dx = torch.empty_like(h) if needs_dx else None
    dgamma, dbeta = (torch.empty_like(gamma), torch.empty_like(gamma)) if needs_parameters else (None, None)
    _loaded["layer_norm"].backward(
        storage=STORAGE_CODES[h.dtype], dy=dy.data_ptr(), dh=_pointer(dh), x=h.data_ptr(),
        gamma=gamma.data_ptr(), dx=_pointer(dx), dgamma=_pointer(dgamma), dbeta=_pointer(dbeta),
        rows=rows, n=n, eps=eps, threads=_threads(rows * n, h.dtype),
    )
    return dx, dgamma, dbeta
