# sandkeep — two commands: `make run` and `make test`. Both build the virtual environment when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# tests run on every core (pytest-xdist); `PYTEST_WORKERS=0` runs them in one process
PYTEST_WORKERS ?= auto

.PHONY: run test lint venv host demo bench bench-scale bench-fly clean constraints sim

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/sandkeep serve

host: $(STAMP)
	$(BIN)/sandkeep host

demo: $(STAMP)
	$(BIN)/sandkeep demo

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

# Deterministic simulation (README "Deterministic simulation"): `make sim SEEDS=1000` runs a campaign,
# `make sim SEED=42` replays one seed with its trace; SMALL=1 uses the CI profile; JOBS=n runs the campaign in
# n worker processes (results merged in seed order); SUMMARY=file writes the campaign's summary as JSON.
SEEDS ?= 100
FIRST ?= 1
JOBS ?= 1
sim: $(STAMP)
	PYTHONHASHSEED=0 $(BIN)/python -m sandkeep.sim $(if $(SEED),--seed $(SEED),--seeds $(SEEDS) --first $(FIRST) --jobs $(JOBS) $(if $(SUMMARY),--summary $(SUMMARY))) $(if $(SMALL),--small)

bench: $(STAMP)
	$(BIN)/python -m bench.run

bench-scale: $(STAMP)
	$(BIN)/python -m bench.scale_all

bench-fly: $(STAMP)
	nice -n 10 $(BIN)/python -m bench.fly_detect --n $(or $(N),10000) --warmup 100 --ramp 40 --crashes 40 --settle 45

# Regenerate the pinned constraints from the current environment (maintainers only).
constraints: $(STAMP)
	$(BIN)/python -m pip freeze --all --exclude-editable | grep -v -E '^(sandkeep|pip)([=@ ]|$$)' > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
