"""The ``rankguard`` console script. Each subcommand registers its parser here and imports
its heavy dependencies only when it runs, so ``rankguard --help`` stays fast and
``rankguard upload`` never loads the server.

To add a subcommand: write ``_add_<name>(subparsers)`` that sets ``func`` to a runner taking
the parsed args and returning an exit code, and append it to ``SUBCOMMANDS``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

Subparsers = Any  # argparse._SubParsersAction is private


def _run_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from rankguard.server.config import Settings
    from rankguard.server.main import create_app

    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "database_url": args.database_url,
            "host": args.host,
            "port": args.port,
            "max_body_bytes": args.max_body_bytes,
            "no_auth": args.no_auth or None,
            "force_no_auth": args.force_no_auth or None,
        }.items()
        if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"rankguard serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        access_log=args.access_log,
    )
    return 0


def _add_serve(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the rankguard server (API, dashboard)",
        description="Run the server. Every flag also reads RANKGUARD_<NAME> from the "
        "environment; flags win. The admin token comes from RANKGUARD_ADMIN_TOKEN or is "
        "generated and printed once on the first start.",
    )
    p.add_argument(
        "--database-url",
        help="SQLAlchemy URL (default sqlite:///./rankguard.db; "
        "postgresql+psycopg://user:pass@host/db for PostgreSQL)",
    )
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument(
        "--max-body-bytes",
        type=int,
        help="largest request body, also after gzip decompression (default 16 MiB)",
    )
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="serve without tokens (loopback binds only, unless --force-no-auth)",
    )
    p.add_argument(
        "--force-no-auth", action="store_true", help="allow --no-auth on a non-loopback bind"
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--no-access-log", dest="access_log", action="store_false")
    p.set_defaults(func=_run_serve)


def _run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rankguard.dashboard.report import RunNotFoundError, build_report
    from rankguard.server.config import Settings
    from rankguard.server.db import Database, make_engine

    settings = Settings(**({"database_url": args.database_url} if args.database_url else {}))
    db = Database(make_engine(settings), lock_timeout_s=settings.pool_timeout_s)
    try:
        with db.read() as session:
            html = build_report(session, args.run_id)
    except RunNotFoundError as exc:
        print(f"rankguard report: {exc} ({settings.database_url})", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    Path(args.output).write_text(html, encoding="utf-8")
    print(f"rankguard report: wrote {args.output} ({len(html) / 1e6:.1f} MB)", file=sys.stderr)
    return 0


def _add_report(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="write a run's dashboard as one self-contained HTML file",
        description="Write the run's figures, alerts and alert/intervention timeline to one "
        "HTML file with plotly.js inlined: it opens offline. Reads the database directly.",
    )
    p.add_argument("run_id", metavar="RUN_ID", help="the run's id")
    p.add_argument("-o", "--output", default="report.html", help="output file (report.html)")
    p.add_argument(
        "--database-url", help="SQLAlchemy URL (default: RANKGUARD_DATABASE_URL or ./rankguard.db)"
    )
    p.set_defaults(func=_run_report)


def _run_upload(args: argparse.Namespace) -> int:
    import logging
    import os

    from rankguard.probe.upload import upload

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    token = args.token or os.environ.get("RANKGUARD_TOKEN")
    exit_code = 0
    for path in args.paths:
        try:
            report = upload(path, server=args.server, token=token, timeout=args.timeout)
        except (OSError, ValueError) as exc:
            print(f"rankguard upload: {exc}", file=sys.stderr)
            exit_code = 1
            continue
        print(f"rankguard upload: {path}: {report}", file=sys.stderr)
        if not report.delivered_all:
            exit_code = 1
    return exit_code


def _add_upload(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "upload",
        help="send an offline or spilled run file to a server",
        description="Replay JSON Lines files written by the probe (offline runs, or spill "
        "files of runs whose server was down). Ingest is idempotent: uploading twice stores "
        "each point once. A line that does not parse (or a last line cut short by a kill) is "
        "skipped and named; the exit status is 1 when anything was not delivered.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="the probe's .jsonl file(s)")
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--token", help="ingest-scope token (default: RANKGUARD_TOKEN)")
    p.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait per file (default 600)"
    )
    p.set_defaults(func=_run_upload)


def _run_token(args: argparse.Namespace) -> int:
    import os

    import httpx

    admin = args.admin_token or os.environ.get("RANKGUARD_ADMIN_TOKEN")
    if not admin:
        print("rankguard token: needs --admin-token or RANKGUARD_ADMIN_TOKEN", file=sys.stderr)
        return 2
    scopes = args.scope or ["job"]
    body: dict[str, Any] = {
        "name": args.name or ("job" if scopes == ["job"] else "-".join(scopes)),
        "project": args.project,
        "scopes": scopes,
    }
    if args.run:
        body["run_id"] = args.run
    try:
        response = httpx.post(
            f"{args.server.rstrip('/')}/api/v1/tokens",
            json=body,
            headers={"Authorization": f"Bearer {admin}"},
            timeout=30,
        )
    except httpx.HTTPError as exc:
        print(f"rankguard token: {args.server}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 201:
        print(f"rankguard token: HTTP {response.status_code}: {response.text}", file=sys.stderr)
        return 1
    token = response.json()
    bound = f", run {token['run_id']}" if token.get("run_id") else ""
    print(
        f"rankguard token: {token['name']} ({', '.join(token['scopes'])}; project "
        f"{token['project']}{bound}); shown once:",
        file=sys.stderr,
    )
    print(token["token"])  # stdout: the secret alone, for RANKGUARD_TOKEN=$(rankguard token ...)
    return 0


def _add_token(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "token",
        help="mint a token (by default a job token for one training run)",
        description="Asks a running server for a new token and prints its secret (once) on "
        "stdout. A job token (the default scope) acts on one run alone: the one given with "
        "--run, or else the first run it registers. Give each training job its own.",
    )
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--project", default="default", help="the token's project (default)")
    p.add_argument(
        "--scope",
        action="append",
        choices=["job", "ingest", "read", "operate", "admin", "metrics"],
        help="a scope (repeatable; default: job)",
    )
    p.add_argument("--run", help="job scope: bind the token to this existing run id")
    p.add_argument("--name", help="a name to tell the token apart in listings")
    p.add_argument("--admin-token", help="an admin token (default: RANKGUARD_ADMIN_TOKEN)")
    p.set_defaults(func=_run_token)


def _run_demo(args: argparse.Namespace) -> int:
    # the demo trains with torch (the probe's side of the package, shipped in the wheel);
    # imported here so that the server's own commands never import torch
    try:
        from rankguard.probe.demo.run import run_demo
    except ImportError as exc:
        print(f"rankguard demo: needs torch installed ({exc})", file=sys.stderr)
        return 2
    run_demo(port=args.port, seed=args.seed, max_steps=args.steps)
    return 0


def _add_demo(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a failing run with the probe attached and watch rankguard rescue it",
        description="Starts the server on ./rankguard.db in the background (left running), "
        "trains the qk_lr_overflow scenario with the probe attached and automatic MSign "
        "allowed, and prints the alerts and a summary table.",
    )
    p.add_argument("--port", type=int, default=8000, help="server port (default 8000)")
    p.add_argument("--seed", type=int, default=0, help="scenario seed (default 0)")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    p.set_defaults(func=_run_demo)


SUBCOMMANDS: list[Callable[[Subparsers], None]] = [
    _add_serve,
    _add_report,
    _add_upload,
    _add_token,
    _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rankguard", description="Spectral early warning and repair for PyTorch training."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
