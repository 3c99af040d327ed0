# make demo  - create .venv, install, migrate and run web + worker + start_init (embedded default)
# make dev   - make demo whose worker restarts when the project's Python files change
# make test  - the whole suite: lint, type checks, unit and integration tests
# make bench - benchmarks against the alternatives (bench/results/; about 22 min; needs wrk,
#   and 11 GiB free under var/ for the 2 GiB figures)
# make soak  - a 10-minute pipeline with a 1 GiB artifact, its workers killed every 1-2 min
# make test-postgres, test-rabbitmq, test-py312, test-install - the other legs of the CI
#   matrix (.ci/run)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8000
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv venv312 demo dev banner demo-setup test lint format bench soak clean test-postgres test-rabbitmq test-py312 \
	test-install

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
# project/run.py is honcho with time for the worker to hand its phases back on Ctrl-C.
demo: demo-setup
	$(BIN)/python manage.py start_init
	@$(MAKE) --no-print-directory banner
	$(BIN)/python -m project.run start --port $(PORT) web worker

# make demo, for editing the project: the worker restarts when a Python file of the project
# changes (watchfiles; it hands its running phases back first), Gunicorn reloads its
# workers. After editing a phase, run start_init again: only what changed runs.
dev: demo-setup
	$(BIN)/python manage.py start_init
	@$(MAKE) --no-print-directory banner
	$(BIN)/python -m project.run start -f Procfile.dev --port $(PORT) web worker

banner:
	@echo
	@echo "  demo site:          http://127.0.0.1:$(PORT)/"
	@echo "  admin progress:     http://127.0.0.1:$(PORT)/admin/initpipeline/pipelinerun/progress/  (user admin, password admin)"
	@echo "  readiness probe:    http://127.0.0.1:$(PORT)/init/readyz"
	@echo "  status from a shell: $(BIN)/python manage.py init_status --watch"
	@echo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/pytest --durations=10

# -- The rest of the CI matrix ------------------------------------------------------------
# Tests that need neither a browser nor the minutes of the Gunicorn and benchmark runs.
CORE_TESTS := -m "not browser" --ignore=tests/test_admin_browser.py \
	--ignore=tests/test_gunicorn.py --ignore=tests/test_bench.py
# pytest-django reads DATABASES before any fixture runs, so a suite on PostgreSQL gets a
# throwaway server (tests/servers.py) around pytest, and DATABASE_URL pointing at it.
ON_POSTGRES := $(BIN)/python -m tests.servers postgres --

# PostgreSQL, with Redis as the broker of every test that names none. Left to make test
# and test-rabbitmq (which runs them on PostgreSQL): the hour-scale tests. Left to make test:
# the filesystem broker's runs (it is the embedded default's, beside SQLite), and the tests
# with servers of their own or no database (the hosts, a new project, the demo's sizes,
# code hashes, digests, deploy files, the upgrade from the previous release, Prometheus,
# trace exporters), which would run the same here. The metrics' queries do run here
# (tests/test_metrics.py).
PG_SAME := --ignore=tests/test_hosts.py --ignore=tests/test_new_project.py \
	--ignore=tests/test_demo.py --ignore=tests/test_codehash.py --ignore=tests/test_deploy.py \
	--ignore=tests/test_prometheus.py --ignore=tests/test_tracing.py \
	--ignore=tests/test_digests.py --ignore=tests/test_upgrade.py \
	--ignore=tests/test_long_phases.py --ignore=tests/test_shards.py
test-postgres: venv
	INITPIPELINE_TEST_BROKER=redis $(ON_POSTGRES) $(BIN)/pytest $(CORE_TESTS) $(PG_SAME) \
		-k "not rabbitmq and not filesystem" --durations=10

# PostgreSQL and RabbitMQ: every test with worker processes, killed ones included, and the
# hour-scale ones (hand-off, skew, checkpoint resume, LOST_LIMIT, shards).
test-rabbitmq: venv
	INITPIPELINE_TEST_BROKER=rabbitmq $(ON_POSTGRES) $(BIN)/pytest -k rabbitmq \
		tests/test_pipeline_integration.py tests/test_commands_integration.py tests/test_recovery.py \
		tests/test_long_phases.py tests/test_shards.py

# Django 6 on Python 3.12, in a venv of its own: requirements-dev.txt's test tools and
# requirements.txt with requirements-django6.txt's Django.
PY312   ?= $(shell PYENV_VERSION=3.12.1 pyenv which python 2>/dev/null || command -v python3.12)
VENV312 ?= .venv312
LINT_ONLY := ^(-r |mypy|django-stubs|celery-types|ruff|matplotlib|playwright)

$(VENV312)/.installed: requirements.txt requirements-dev.txt requirements-django6.txt pyproject.toml
	@test -n "$(PY312)" || { echo "no Python 3.12 (pyenv install 3.12, or PY312=...)"; exit 1; }
	$(PY312) -m venv $(VENV312)
	$(VENV312)/bin/pip install -q --upgrade pip
	sed '/^Django==/d' requirements.txt > $(VENV312)/requirements.txt
	grep -v -E '$(LINT_ONLY)' requirements-dev.txt > $(VENV312)/requirements-dev.txt
	$(VENV312)/bin/pip install -q -r $(VENV312)/requirements.txt \
		-r $(VENV312)/requirements-dev.txt -r requirements-django6.txt -e .
	touch $@

venv312: $(VENV312)/.installed

# The unit tests, then the integration suite (every broker) and one of each kind of
# hour-scale test (hand-off, skew, checkpoint resume, LOST_LIMIT, a shard's loss) on the
# filesystem broker: the other legs run them all on Redis and RabbitMQ.
test-py312: $(VENV312)/.installed
	$(VENV312)/bin/python -c "import django, sys; print('Django', django.__version__, 'on Python', sys.version.split()[0])"
	$(VENV312)/bin/pytest -m "not slow"
	$(VENV312)/bin/pytest tests/test_pipeline_integration.py
	$(VENV312)/bin/pytest tests/test_long_phases.py tests/test_shards.py \
		-k "(sigterm_hands or other_code or killed_after_a_checkpoint or lost_limit or killed_mid_shard) and not redis and not rabbitmq"

# What a production host installs, and nothing else: requirements.txt and the project in a
# fresh venv, without the test tools (they bring packages such as packaging, which kombu's
# Redis transport imports). Then the demo with a real worker on Redis and on RabbitMQ.
INSTALL_VENV ?= var/install-venv

test-install:
	rm -rf $(INSTALL_VENV)
	$(PYTHON) -m venv $(INSTALL_VENV)
	@# Built from a copy: an in-tree build leaves build/lib behind, whose stale modules
	@# would end up in the next wheel built here.
	mkdir $(INSTALL_VENV)/src
	cp -r pyproject.toml README.md initpipeline $(INSTALL_VENV)/src/
	$(INSTALL_VENV)/bin/pip install -q -r requirements.txt $(abspath $(INSTALL_VENV))/src
	$(INSTALL_VENV)/bin/python -m tests.install_check redis rabbitmq

bench: venv
	$(BIN)/python -m bench

# Not in make test: 15 minutes of a pipeline whose workers are killed every 1-2 minutes.
soak: venv
	$(BIN)/python -m bench.soak

clean:
	rm -rf var
