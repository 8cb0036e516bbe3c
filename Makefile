# The two commands of the README. Both set up what they need first (idempotent).
.PHONY: demo test setup lint

setup:
	./scripts/setup.sh --system

demo: setup
	.venv/bin/rankguard demo

test: setup
	./scripts/test.sh

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
