"""Execute notebooks in place, top to bottom in a fresh kernel, and save them with their outputs.

    python -m normlib.book.execute chapters/02_batch_norm.ipynb [more.ipynb ...]

This is how a chapter's committed outputs are produced; CI's nbval then re-runs each notebook and
compares. The kernel starts in the notebook's folder, as it does in Jupyter, Binder and Colab.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def execute(path: Path, timeout: int = 600) -> float:
    """Run every cell of the notebook at ``path`` and write it back; return the seconds it took."""
    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,  # per-cell timestamps would make every re-run a diff of the file
        resources={"metadata": {"path": str(path.parent)}},
    )
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    nbformat.write(notebook, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path, help="the .ipynb files to execute in place")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    for path in args.notebooks:
        if path.suffix != ".ipynb" or not path.is_file():
            parser.error(f"notebooks: {path} is not an existing .ipynb file")
    for path in args.notebooks:
        print(f"executing {path} ...", flush=True)
        seconds = execute(path, args.timeout)
        print(f"  done in {seconds:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
