"""normlib installs as a package: a wheel built from the repository holds every module and the C
sources of the CPU path, and a copy installed from it into a fresh virtual environment imports,
compiles its C kernels from the installed sources and computes rms_norm.

The build runs on a copy of the files a build reads (so no ``build/`` folder appears in the
repository) with the setuptools already installed (``--no-build-isolation``: nothing downloaded).
The virtual environment gets normlib's dependencies by a ``.pth`` line pointing at the running
interpreter's site-packages, where ``.pth`` files, such as the editable install's, are not run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

import normlib
import normlib.cpu.native

REPO = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "normlib")


def package_files() -> set[str]:
    """What the wheel must hold: every module, C source and header of normlib in the repository."""
    return {
        path.relative_to(REPO).as_posix()
        for path in (REPO / "normlib").rglob("*")
        if path.is_file() and path.suffix in {".py", ".c", ".h"} and "__pycache__" not in path.parts
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # the build backend pyproject.toml names, from this environment: nothing is downloaded
    pytest.importorskip("setuptools", minversion="64", reason="pyproject.toml's build backend, setuptools>=64")
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_INPUTS:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(origin, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("normlib-*.whl")
    return built


def test_wheel_holds_the_modules_the_c_sources_and_the_version(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"normlib/cpu/rms_norm.c", "normlib/cpu/layer_norm.c", "normlib/cpu/_kernels.h"} <= names
    missing = package_files() - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert wheel.name.startswith(f"normlib-{normlib.__version__}-")
    (metadata,) = [name for name in names if name.endswith(".dist-info/METADATA")]
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert f"\nVersion: {normlib.__version__}\n" in text
    assert not [name for name in names if name.startswith(("tests/", "chapters/"))]


def test_installed_copy_imports_compiles_and_runs(wheel: Path, tmp_path: Path):
    environment = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(environment)], check=True, timeout=120)
    python = environment / "bin" / "python"
    site_packages = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site_packages / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
        check=True,
        timeout=300,
    )
    script = textwrap.dedent(
        """
        import sys
        import torch
        import normlib, normlib.cpu.native
        print(normlib.__file__)
        print(normlib.__version__)
        print(normlib.cpu.native.unavailable_reason())
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
        weight = torch.rand(64, generator=torch.Generator().manual_seed(1))
        for backend in ("torch", "cpu"):
            y = normlib.rms_norm(x, 64, weight, 1e-6, backend=backend)
            expected = torch.nn.functional.rms_norm(x, (64,), weight, 1e-6)
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        print("computed")
        """
    )
    run = subprocess.run(
        [str(python), "-c", script],
        cwd=tmp_path,  # not the repository: the installed copy must be the one imported
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "NORMLIB_CACHE_DIR": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    location, version, reason, computed = run.stdout.splitlines()[-4:]
    assert Path(location).is_relative_to(site_packages)
    assert version == normlib.__version__
    assert computed == "computed"
    # where the repository's copy compiles its C kernels, the installed copy does too, from its own sources
    assert reason == str(normlib.cpu.native.unavailable_reason())
    if normlib.cpu.native.unavailable_reason() is None:
        assert any((tmp_path / "cache").rglob("*.so")), "the installed copy built no C extension"


def test_readme_example_runs():
    """README's example of swapping a model's norms, run as written."""
    pytest.importorskip("transformers")
    readme = (REPO / "README.md").read_text()
    section = readme.split("## normlib in your own code", 1)[1].split("\n## ", 1)[0]
    (example,) = [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]
    assert "convert_norms" in example and len(example.strip().splitlines()) <= 6
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert not [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert sum(isinstance(m, normlib.RMSNorm) for m in model.modules()) == 2 * 2 + 1
