# The two commands a fresh machine needs: `make demo` and `make test`.
.PHONY: demo test install install-test bench

install:
	bash scripts/setup.sh

install-test:
	bash scripts/setup.sh --test

demo: install
	.venv/bin/mmtune demo

test: install-test
	.venv/bin/python -m pytest -q

bench: install
	.venv/bin/python bench/speed.py
