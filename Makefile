# The README's commands. `make run` and `make test` each do all their own set-up.
PY ?= python3
PIP = $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install run deps test check bench

install:
	$(PIP) -e .

# Run the relay in the foreground on the default config (127.0.0.1:2525).
run: install
	$(PY) -m relay run --config config/relay.toml

# Everything the tests need: Python packages and the real peers
# (Postfix, dnsmasq, swaks) from Debian's packages.
deps:
	$(PIP) -e '.[test]'
	./scripts/install-system-deps

test: deps
	$(PY) -m pytest $(PYTEST_ARGS)

check: deps
	ruff check relay tests
	ruff format --check relay tests
	mypy relay

bench: deps
	$(PY) -m tests.bench
