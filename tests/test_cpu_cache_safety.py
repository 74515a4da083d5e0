"""The C kernels' build cache never runs code another user could have written (normlib/cpu/native.py).

A library is planted where normlib looks for its own: a tiny C file whose constructor writes a
marker file as soon as the library is loaded, under the very name normlib's own build has (taken
from this process's build), so any path that loaded it would leave the marker. Each case runs a
fresh Python process with NORMLIB_CACHE_DIR and TMPDIR inside tmp_path, which keeps the module's
state (loaded libraries, the one warning) out of the rest of the suite; the process checks the
results against the "torch" backend and reports where its libraries came from. The cases hold for
root too (CI runs as root): a directory of mode 0777, or owned by another uid, is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from normlib.cpu import native

OTHER_UID = 4242  # a uid no one on the test machine is expected to be

PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>

__attribute__((constructor)) static void planted(void) {
    const char *marker = getenv("PLANTED_MARKER");
    FILE *file = marker ? fopen(marker, "w") : NULL;
    if (file) { fputs("the planted library ran\n", file); fclose(file); }
}
"""

# Runs both kernels through backend="cpu", compares with backend="torch", and prints what it saw.
# native._compile is wrapped to count builds: extension() binds it at call time.
SCRIPT = r"""
import json, warnings, torch, normlib
from normlib.cpu import native

builds = []
compile_ = native._compile
native._compile = lambda compiler, source, *rest: (builds.append(source.stem), compile_(compiler, source, *rest))
x, r, w, b = torch.randn(7, 33), torch.randn(7, 33), torch.rand(33) + 0.5, torch.randn(33)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ours = (normlib.rms_norm(x, 33, w, backend="cpu"), *normlib.add_layer_norm(x, r, 33, w, b, backend="cpu"))
    theirs = (normlib.rms_norm(x, 33, w, backend="torch"), *normlib.add_layer_norm(x, r, 33, w, b, backend="torch"))
for a, e in zip(ours, theirs):
    torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
print(json.dumps({
    "reasons": {name: native.unavailable_reason(name) for name in native.KERNELS},
    "files": {name: getattr(native.extension(name), "__file__", None) for name in native.KERNELS},
    "builds": builds,
    "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
}))
"""


@pytest.fixture(scope="module")
def own_libraries() -> dict[str, Path]:
    """This process's libraries, by kernel: their names are the ones a fresh process looks for."""
    for name in native.KERNELS:
        if native.unavailable_reason(name) is not None:
            pytest.skip(f"C kernels unavailable: {native.unavailable_reason(name)}")
    return {name: Path(native.extension(name).__file__) for name in native.KERNELS}


@pytest.fixture(scope="module")
def planted_library(tmp_path_factory, own_libraries) -> Path:
    """The library to plant, checked to leave its marker when loaded (else no test could fail)."""
    directory = tmp_path_factory.mktemp("planted")
    source, library, marker = directory / "planted.c", directory / "planted.so", directory / "marker"
    source.write_text(PLANTED_C)
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(library)], check=True, timeout=120)
    loading = f"import ctypes; ctypes.CDLL({str(library)!r})"
    subprocess.run([sys.executable, "-c", loading], env=dict(os.environ, PLANTED_MARKER=str(marker)), check=True)
    assert marker.exists(), "the planted library did not write its marker when loaded"
    return library


def run_normlib(tmp_path: Path, cache_dir: Path, temporary_dir: Path) -> dict:
    """Runs SCRIPT in a fresh process; fails if the planted library ran there."""
    marker = tmp_path / "marker"
    env = dict(os.environ, NORMLIB_CACHE_DIR=str(cache_dir), TMPDIR=str(temporary_dir), PLANTED_MARKER=str(marker))
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not marker.exists(), "normlib loaded the planted library"
    return json.loads(done.stdout.splitlines()[-1])


def plant(directory: Path, planted_library: Path, own_libraries: dict[str, Path]) -> None:
    for own in own_libraries.values():
        shutil.copy(planted_library, directory / own.name)


def make_foreign(path: Path) -> None:
    """Gives ``path`` to another uid: only root can."""
    if os.getuid() != 0:
        pytest.skip("only root can give a file to another uid")
    os.chown(path, OTHER_UID, OTHER_UID)


def private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    path.chmod(0o700)  # whatever the umask
    return path


@pytest.mark.parametrize("exposure", ["mode 0777", "group-writable", "owned by another uid", "inside a directory of mode 0777"])
def test_a_library_planted_in_a_cache_others_can_write_never_runs(tmp_path, planted_library, own_libraries, exposure):
    """NORMLIB_CACHE_DIR others can write is refused with a warning; the kernels are built in a
    private directory in the temporary directory instead, created with mode 0700."""
    if exposure == "inside a directory of mode 0777":
        (tmp_path / "shared").mkdir(mode=0o777)
        (tmp_path / "shared").chmod(0o777)
        cache = private_dir(tmp_path / "shared" / "cache")
    else:
        cache = private_dir(tmp_path / "cache")
    plant(cache, planted_library, own_libraries)
    if exposure == "mode 0777":
        cache.chmod(0o777)
    elif exposure == "group-writable":
        cache.chmod(0o770)
    elif exposure == "owned by another uid":
        make_foreign(cache)
    temporary = private_dir(tmp_path / "tmp")

    seen = run_normlib(tmp_path, cache, temporary)

    fallback = temporary / f"normlib-{os.getuid()}"
    assert seen["reasons"] == {name: None for name in native.KERNELS}
    assert {name: Path(file).parent for name, file in seen["files"].items()} == {name: fallback for name in native.KERNELS}
    assert (fallback.stat().st_mode & 0o777) == 0o700
    assert len(seen["warnings"]) == 1, seen["warnings"]
    assert str(cache) in seen["warnings"][0] and "NORMLIB_CACHE_DIR" in seen["warnings"][0], seen["warnings"]


@pytest.mark.parametrize("exposure", ["mode 0777", "owned by another uid"])
def test_a_library_planted_in_a_pre_created_temporary_fallback_never_runs(tmp_path, planted_library, own_libraries, exposure):
    """A cache that cannot be written sends normlib to <tempdir>/normlib-<uid>; when someone else
    created that first, it is refused and the plain-PyTorch path runs, with a reason and one warning."""
    (tmp_path / "a-file").write_text("")
    cache = tmp_path / "a-file" / "cache"  # cannot be created, even by root: a read-only cache
    temporary = private_dir(tmp_path / "tmp")
    fallback = temporary / f"normlib-{os.getuid()}"
    fallback.mkdir()
    plant(fallback, planted_library, own_libraries)
    if exposure == "mode 0777":
        fallback.chmod(0o777)
    else:
        make_foreign(fallback)

    seen = run_normlib(tmp_path, cache, temporary)

    assert seen["files"] == {name: None for name in native.KERNELS}
    for name, reason in seen["reasons"].items():
        assert str(fallback) in reason and str(cache) in reason, (name, reason)
    assert len(seen["warnings"]) == 1, seen["warnings"]
    assert str(fallback) in seen["warnings"][0], seen["warnings"]


@pytest.mark.parametrize("exposure", ["writable by others", "owned by another uid", "a link to it"])
def test_a_planted_file_in_a_private_cache_is_replaced_not_run(tmp_path, planted_library, own_libraries, exposure):
    """In a cache of the user's own, a file others can write (or own, or link to) is rebuilt."""
    cache = private_dir(tmp_path / "cache")
    for name, own in own_libraries.items():
        target = cache / own.name
        if exposure == "a link to it":
            target.symlink_to(planted_library)
        else:
            shutil.copy(planted_library, target)
            if exposure == "writable by others":
                target.chmod(0o777)
            else:
                make_foreign(target)

    seen = run_normlib(tmp_path, cache, private_dir(tmp_path / "tmp"))

    assert seen["reasons"] == {name: None for name in native.KERNELS}
    assert sorted(seen["builds"]) == sorted(native.KERNELS)
    assert seen["warnings"] == []
    for name, own in own_libraries.items():
        assert seen["files"][name] == str(cache / own.name)
        info = os.lstat(cache / own.name)
        assert info.st_uid == os.getuid() and not info.st_mode & 0o022 and not (cache / own.name).is_symlink()


@pytest.mark.parametrize("damage", ["intact", "empty", "truncated", "not a library"])
def test_a_broken_cached_library_is_rebuilt_once(tmp_path, own_libraries, damage):
    """A cached library that does not load is rebuilt once and used; an intact one is not rebuilt."""
    cache = private_dir(tmp_path / "cache")
    for own in own_libraries.values():
        content = own.read_bytes()
        damaged = {
            "intact": content,
            "empty": b"",
            "truncated": content[: len(content) // 2],
            "not a library": b"\x7fELF" + bytes(range(256)) * 8,
        }[damage]
        (cache / own.name).write_bytes(damaged)
        (cache / own.name).chmod(0o755)

    seen = run_normlib(tmp_path, cache, private_dir(tmp_path / "tmp"))

    assert seen["reasons"] == {name: None for name in native.KERNELS}
    assert sorted(seen["builds"]) == ([] if damage == "intact" else sorted(native.KERNELS))
    for name, own in own_libraries.items():
        assert seen["files"][name] == str(cache / own.name)
        assert (cache / own.name).stat().st_size > 0
