# The two commands of the README. Each sets up what it needs first (idempotent).
.PHONY: demo test lint

# Python side only: .venv with torch (CPU build unless one is there) and rankguard[dev].
demo:
	./scripts/setup.sh
	.venv/bin/rankguard demo

# Also Debian's chromium, prometheus and docker-compose for the browser, scrape and
# compose tests.
test:
	./scripts/setup.sh --system
	./scripts/test.sh

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && ./scripts/typecheck.sh
