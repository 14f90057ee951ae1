# Two commands for a newcomer: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# Re-install only when a dependency file changes; a second `make test` reuses the venv.
STAMP := $(VENV)/.installed
PG_URL ?= postgresql+psycopg2://postgres@127.0.0.1:5432/test
# pytest-xdist workers: the end-to-end tests run in order on one of them (tests/conftest.py);
# tests marked `exclusive` measure throughput, so they run afterwards with the machine to themselves
TEST_WORKERS ?= 2
PYTEST := $(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadgroup
# The demo's Airflow UI, on loopback only; `make demo` writes it into the demo's home, `make ui` serves it.
UI_PORT ?= 8080

.PHONY: venv test test-fast lint postgres redis demo ui bench clean

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check \
		-r requirements.txt -r requirements-dev.txt -c constraints.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

venv: $(STAMP)

postgres:
	scripts/ensure-postgres

redis:
	scripts/ensure-redis

test: venv postgres redis
	GROWTHHUB_TEST_PG_URL=$(PG_URL) $(PYTEST) -m "not exclusive"
	GROWTHHUB_TEST_PG_URL=$(PG_URL) $(VENV)/bin/pytest -m exclusive

# Everything but the tests marked slow: for the edit-test loop, not a substitute for `make test`.
test-fast: venv postgres redis
	GROWTHHUB_TEST_PG_URL=$(PG_URL) $(PYTEST) -m "not slow"

# The embedded default: SQLite warehouse + SQLite Airflow metadata DB + the sandbox; no services needed.
# LOCATIONS=20: the same as an agency whose table feeds 20 locations (plus an uninstalled one).
demo: venv
	$(PY) scripts/demo.py --port $(UI_PORT)$(if $(LOCATIONS), --locations $(LOCATIONS))

# The Airflow UI on the demo's home (its runs, logs, notes, the GrowthHub page) until Ctrl-C.
ui: venv
	$(PY) scripts/demo.py ui --port $(UI_PORT)

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .airflow var .pytest_cache .ruff_cache
