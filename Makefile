# make demo  - create .venv, install, migrate and run web + worker + start_init (embedded default)
# make test  - the whole suite: lint, type checks, unit and integration tests
# make bench - benchmarks against the alternatives (bench/results/)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8000
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv demo demo-setup test lint format bench clean

$(BIN)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt -e .
	touch $@

venv: $(BIN)/.installed

demo-setup: venv
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py collectstatic --noinput -v 0
	$(BIN)/python manage.py demo_user

# The release step runs first and only enqueues; honcho then runs web and worker, which
# picks the run up. (honcho stops every process when one exits, so release is not in it.)
demo: demo-setup
	$(BIN)/python manage.py start_init
	@echo
	@echo "  demo site:          http://127.0.0.1:$(PORT)/"
	@echo "  admin progress:     http://127.0.0.1:$(PORT)/admin/initpipeline/pipelinerun/progress/  (user admin, password admin)"
	@echo "  readiness probe:    http://127.0.0.1:$(PORT)/init/readyz"
	@echo "  status from a shell: $(BIN)/python manage.py init_status --watch"
	@echo
	$(BIN)/honcho start --port $(PORT) web worker

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/pytest

bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf var
