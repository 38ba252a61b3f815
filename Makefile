# The two commands a fresh machine needs: `make demo` and `make test`.
.PHONY: demo test install install-test bench docs

install:
	bash scripts/setup.sh

install-test:
	bash scripts/setup.sh --test

demo: install
	.venv/bin/mmtune demo

# The suite (two worker processes, one per core: pytest-xdist), then its seeded tests of trained quantities
# again on PyTorch's portable CPU kernels (ATEN_CPU_CAPABILITY=default), so a result that depends on the CPU's
# vector unit fails here too.
test: install-test
	.venv/bin/python -m pytest -q -n 2 --durations=10
	ATEN_CPU_CAPABILITY=default .venv/bin/python -m pytest -q -n 2 -m stochastic

bench: install
	.venv/bin/python bench/speed.py

# The documentation site, offline, into site/ (the test suite builds it with --strict too).
docs: install-test
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict
