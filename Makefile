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

.PHONY: setup book test notebooks clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

book: $(STAMP)
	$(BIN)/jupyter-book build . -W -n --keep-going
	@echo
	@echo "The book is in _build/html. Open _build/html/index.html in a browser, or serve it with:"
	@echo "  $(BIN)/python -m http.server --directory _build/html 8000   (then visit http://localhost:8000)"

test: $(STAMP)
	$(BIN)/python -m pytest tests chapters --nbval --nbval-current-env \
		--nbval-sanitize-with tests/nbval_sanitize.cfg

# Re-execute every chapter in place (after changing one): the outputs nbval compares against.
notebooks: $(STAMP)
	$(BIN)/python -m normlib.book.execute chapters/*.ipynb

clean:
	rm -rf $(VENV) _build
