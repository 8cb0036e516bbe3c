#!/bin/sh
# Container entry point: before `serve`, wait (bounded) until the PostgreSQL database named by
# RANKGUARD_DATABASE_URL accepts connections, then hand over to `rankguard`. compose's
# depends_on/service_healthy covers the first start; this covers restarts and orchestrators
# without health ordering. RANKGUARD_DB_WAIT_S (default 60) bounds the wait; 0 disables it.
set -eu

if [ "${1:-}" = "serve" ]; then
    python - <<'PY'
import os
import sys
import time

url = os.environ.get("RANKGUARD_DATABASE_URL", "")
timeout_s = float(os.environ.get("RANKGUARD_DB_WAIT_S", "60"))
if url.startswith("postgresql") and timeout_s > 0:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    shown = engine.url.render_as_string(hide_password=True)
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while True:
        attempt += 1
        try:
            with engine.connect():
                break
        except sqlalchemy.exc.OperationalError as exc:
            if time.monotonic() >= deadline:
                print(
                    f"rankguard: database {shown} still unreachable after {timeout_s:.0f} s "
                    f"({attempt} attempts): {exc.orig}",
                    file=sys.stderr,
                )
                sys.exit(1)
            if attempt == 1:
                print(f"rankguard: waiting for database {shown} ...", file=sys.stderr)
            time.sleep(1)
    engine.dispose()
PY
fi

exec rankguard "$@"
