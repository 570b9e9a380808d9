# The README's commands. `make run` and `make test` each do all their own set-up.
#
# Everything is installed into a virtual environment: the one make runs in
# ($VIRTUAL_ENV, e.g. after `. venv/bin/activate`), else .venv in this
# checkout, created on first use. Debian's and Ubuntu's python3 refuse
# `pip install` outside a venv (PEP 668, "externally-managed-environment").
# PYTHON is the interpreter that creates .venv: `make test PYTHON=python3.12`.
PYTHON ?= python3
VENV := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
PIP = $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: venv install run deps test check bench

# Debian ships venv's pip bootstrap (ensurepip) in python3-venv, which a
# stock system may lack: install-system-deps --venv installs it.
$(PY):
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || PYTHON=$(PYTHON) ./scripts/install-system-deps --venv
	$(PYTHON) -m venv $(VENV)

venv: $(PY)

install: $(PY)
	$(PIP) -e .

# Run the relay in the foreground on the default config (127.0.0.1:2525).
run: install
	$(PY) -m relay run --config config/relay.toml

# Everything the tests need: Python packages and the real peers
# (Postfix, dnsmasq, swaks with TLS) from Debian's packages.
deps: $(PY)
	$(PIP) -e '.[test]'
	./scripts/install-system-deps

# pyproject's testpaths run tests/unit, then tests/integration, then tests/e2e
# (the cheapest failures first); `make test PYTEST_ARGS=tests/unit` runs one.
# pytest exits 5 when it collected no tests: a failure too, said in words.
test: deps
	@$(PY) -m pytest $(PYTEST_ARGS) || { rc=$$?; \
	  [ $$rc -ne 5 ] || echo "pytest collected no tests" >&2; exit $$rc; }

check: deps
	$(VENV)/bin/ruff check relay tests
	$(VENV)/bin/ruff format --check relay tests
	$(VENV)/bin/mypy relay

bench: deps
	$(PY) -m tests.bench
