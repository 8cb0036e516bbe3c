"""docker-compose.yml, server/Dockerfile and the entrypoint, checked without a container engine:
compose validates and wires the four services, every mount and COPY source exists, and the
image's requirement set (computed by the Dockerfile's own snippet) never contains torch."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers.tools import require_tool

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "server" / "Dockerfile"
ENTRYPOINT = ROOT / "server" / "docker-entrypoint.sh"
PROMETHEUS_DIR = ROOT / "dashboard" / "prometheus"


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9_.-]+", requirement)
    assert match, f"unreadable requirement {requirement!r}"
    return match.group().lower().replace("_", "-")


@pytest.fixture(scope="module")
def compose_config() -> dict[str, Any]:
    """`docker-compose config` output (validated, variables resolved with their defaults)."""
    binary = require_tool("docker-compose", hint="on Debian: apt-get install docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANKGUARD_", "POSTGRES_"))}
    env.pop("GRAFANA_ADMIN_PASSWORD", None)
    result = subprocess.run(
        [binary, "-f", str(COMPOSE), "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of each bind mount (named volumes skipped)."""
    out = []
    for volume in service.get("volumes", []):
        source, target = (
            volume.split(":")[:2]
            if isinstance(volume, str)
            else (
                volume["source"],
                volume["target"],
            )
        )
        if source.startswith(("/", ".")):
            out.append((Path(source), target))
    return out


# --- docker-compose.yml ---------------------------------------------------------------------


def test_compose_has_the_four_services(compose_config: dict[str, Any]) -> None:
    assert set(compose_config["services"]) == {"server", "db", "prometheus", "grafana"}


def test_db_has_a_pg_isready_healthcheck(compose_config: dict[str, Any]) -> None:
    db = compose_config["services"]["db"]
    assert db["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert any(v.endswith("/var/lib/postgresql/data:rw") for v in db["volumes"])


def test_server_waits_for_a_healthy_db_and_reads_its_url(compose_config: dict[str, Any]) -> None:
    server = compose_config["services"]["server"]
    assert server["depends_on"]["db"]["condition"] == "service_healthy"
    env = server["environment"]
    assert env["RANKGUARD_DATABASE_URL"] == (
        "postgresql+psycopg://rankguard:rankguard@db:5432/rankguard"
    )
    assert env["RANKGUARD_ADMIN_TOKEN"], "the local-use default admin token is missing"
    assert server["build"]["dockerfile"] == "server/Dockerfile"
    assert Path(server["build"]["context"]).resolve() == ROOT
    assert [p["target"] for p in server["ports"]] == [8000]
    assert server["command"][:1] == ["serve"]
    assert "/healthz" in " ".join(server["healthcheck"]["test"])


def test_admin_token_comes_from_the_environment() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    token = raw["services"]["server"]["environment"]["RANKGUARD_ADMIN_TOKEN"]
    assert token.startswith("${RANKGUARD_ADMIN_TOKEN:-"), token


def test_prometheus_scrapes_with_the_servers_metrics_token(compose_config: dict[str, Any]) -> None:
    """/metrics needs a token: Prometheus gets the server's, through the file its entrypoint
    writes and prometheus.yml reads; the Host it scrapes by is one the server trusts."""
    server = compose_config["services"]["server"]["environment"]
    prometheus = compose_config["services"]["prometheus"]
    assert server["RANKGUARD_METRICS_TOKEN"]
    assert prometheus["environment"]["RANKGUARD_METRICS_TOKEN"] == server["RANKGUARD_METRICS_TOKEN"]
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    token_file = job["authorization"]["credentials_file"]
    assert token_file in " ".join(prometheus["entrypoint"])
    host = job["static_configs"][0]["targets"][0].split(":")[0]
    assert host in server["RANKGUARD_ALLOWED_HOSTS"].split(",")
    assert len(server["RANKGUARD_ADMIN_TOKEN"]) >= 32


def test_bind_mounts_exist_in_the_repository(compose_config: dict[str, Any]) -> None:
    mounts = {name: bind_mounts(service) for name, service in compose_config["services"].items()}
    assert mounts["prometheus"] and mounts["grafana"]
    for name, pairs in mounts.items():
        for source, _ in pairs:
            assert source.exists(), f"{name}: mount source {source} does not exist"
            assert ROOT in source.resolve().parents, f"{name}: {source} is outside the repo"


def test_prometheus_mount_holds_its_config_and_rules(compose_config: dict[str, Any]) -> None:
    prometheus = compose_config["services"]["prometheus"]
    [(source, target)] = bind_mounts(prometheus)
    assert source.resolve() == PROMETHEUS_DIR
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_in_container = config_flag.split("=", 1)[1]
    assert config_in_container.startswith(target + "/")
    config = yaml.safe_load((source / Path(config_in_container).name).read_text())
    jobs = config["scrape_configs"]
    targets = [t for job in jobs for static in job["static_configs"] for t in static["targets"]]
    assert targets == ["server:8000"]
    for rule_file in config["rule_files"]:
        assert rule_file.startswith(target + "/"), rule_file
        local = source / Path(rule_file).relative_to(target)
        assert local.is_file(), f"Prometheus rule file {rule_file} -> {local} is missing"


def test_prometheus_config_passes_promtool() -> None:
    promtool = require_tool("promtool", hint="on Debian: apt-get install prometheus")
    text = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    config = yaml.safe_load(text)
    # promtool resolves rule files on this machine: point them at the repository's copies.
    config["rule_files"] = [
        str(PROMETHEUS_DIR / Path(p).name) for p in config.get("rule_files", [])
    ]
    with tempfile.TemporaryDirectory() as tmp:
        # ... and at a token file here (compose writes the real one in the container).
        for job in config["scrape_configs"]:
            if "credentials_file" in job.get("authorization", {}):
                token_file = Path(tmp) / f"{job['job_name']}-token"
                token_file.write_text("token")
                job["authorization"]["credentials_file"] = str(token_file)
        path = Path(tmp) / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run(
            [promtool, "check", "config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_mounts_match_the_provisioning_files(compose_config: dict[str, Any]) -> None:
    grafana = compose_config["services"]["grafana"]
    mounts = {target: source for source, target in bind_mounts(grafana)}
    datasources = mounts["/etc/grafana/provisioning/datasources"]
    dashboards = mounts["/etc/grafana/provisioning/dashboards"]
    assert (datasources / "prometheus.yml").is_file()
    assert (dashboards / "rankguard.json").is_file()
    provider = yaml.safe_load((dashboards / "provider.yml").read_text())
    [entry] = provider["providers"]
    assert entry["options"]["path"] == "/etc/grafana/provisioning/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards / Path(home).name).is_file()
    datasource = yaml.safe_load((datasources / "prometheus.yml").read_text())["datasources"][0]
    host = datasource["url"].split("//", 1)[1].split(":", 1)[0]
    assert host in compose_config["services"], f"datasource host {host!r} is not a service"


# --- server/Dockerfile ------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation line"
    out = []
    for line in logical:
        instruction, _, args = line.strip().partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def requirements_snippet() -> str:
    """The python program the Dockerfile runs to compute the image's requirement set."""
    runs = [args for ins, args in dockerfile_instructions() if ins == "RUN" and "tomllib" in args]
    assert len(runs) == 1, "expected one RUN computing the requirements with tomllib"
    match = re.search(r"python -c '([^']*)'", runs[0])
    assert match, "the requirements RUN must be python -c '<program>'"
    return match.group(1)


def test_image_requirements_exclude_torch_and_cover_the_server_extra() -> None:
    pytest.importorskip("tomllib", reason="the snippet uses tomllib (Python >= 3.11)")
    import tomllib

    result = subprocess.run(
        [sys.executable, "-c", requirements_snippet()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    requirements = result.stdout.split()
    names = {requirement_name(r) for r in requirements}
    assert "torch" not in names
    assert not any(n.startswith("torch") or n.startswith("nvidia-") for n in names), names
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    server_extra = {requirement_name(r) for r in project["optional-dependencies"]["server"]}
    assert server_extra <= names, server_extra - names
    assert "httpx" in names


def test_dockerfile_installs_the_package_without_dependencies() -> None:
    runs = [args for ins, args in dockerfile_instructions() if ins == "RUN"]
    installs = [cmd for args in runs for cmd in args.split("&&") if "pip install" in cmd]
    assert installs
    for cmd in installs:
        words = shlex.split(cmd)
        assert not any("torch" in w for w in words), cmd
        if "." in words:  # the project itself
            assert "--no-deps" in words, cmd
        else:
            assert "-r" in words, f"unexpected pip install {cmd!r}"


def test_dockerfile_shape() -> None:
    instructions = dockerfile_instructions()
    froms = [args for ins, args in instructions if ins == "FROM"]
    assert len(froms) >= 2, "expected a multi-stage build"
    assert all("slim" in f for f in froms)
    final_stage = instructions[max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM") :]
    users = [args for ins, args in final_stage if ins == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    healthchecks = [args for ins, args in final_stage if ins == "HEALTHCHECK"]
    assert healthchecks and "/healthz" in healthchecks[0]


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_every_copy_source_exists_and_is_not_docker_ignored() -> None:
    ignored = dockerignore_patterns()
    copies = [args for ins, args in dockerfile_instructions() if ins == "COPY"]
    assert copies
    for args in copies:
        words = shlex.split(args)
        if any(w.startswith("--from") for w in words):
            continue
        sources = [w for w in words if not w.startswith("--")][:-1]
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"COPY source {source} does not exist in the repository"
            for pattern in ignored:
                assert not fnmatch.fnmatch(source.rstrip("/"), pattern), (
                    f"COPY source {source} is excluded by .dockerignore pattern {pattern!r}"
                )


def test_entrypoint_is_valid_shell_and_python() -> None:
    assert os.access(ENTRYPOINT, os.X_OK), "server/docker-entrypoint.sh must be executable"
    result = subprocess.run(["sh", "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = ENTRYPOINT.read_text()
    program = re.search(r"<<'PY'\n(.*?)\nPY\n", text, re.S)
    assert program, "entrypoint: the embedded python wait loop is missing"
    compile(program.group(1), "docker-entrypoint.sh:wait", "exec")
    assert 'exec rankguard "$@"' in text


def test_entrypoint_gives_up_on_an_unreachable_database() -> None:
    """The wait loop is bounded: an unreachable PostgreSQL fails fast with a clear message."""
    text = ENTRYPOINT.read_text()
    program = re.search(r"<<'PY'\n(.*?)\nPY\n", text, re.S)
    assert program
    port = _closed_port()
    env = {
        **os.environ,
        "RANKGUARD_DATABASE_URL": f"postgresql+psycopg://u:secret@127.0.0.1:{port}/x",
        "RANKGUARD_DB_WAIT_S": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", program.group(1)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "still unreachable after 1 s" in result.stderr
    assert "secret" not in result.stderr


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
