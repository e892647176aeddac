# Two commands do all the set-up: `make demo` and `make test` (each creates .venv if needed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	# torch first and pinned: the local CPU wheel; anything else pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q torch==2.13.0 -e '.[dev,lm]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tspd run induction --out runs/demo-induction

test: $(STAMP)
	$(BIN)/python -m pytest -q || [ $$? -eq 5 ]  # 5: no test collected

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) runs
