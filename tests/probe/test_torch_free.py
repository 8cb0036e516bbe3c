"""The torch-free half of the probe (configuration, wire format, transports, ``upload``)
imports and runs where torch is not installed, as ``rankguard upload`` in the server image.

Each check runs in a fresh interpreter whose import system refuses ``torch``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

NO_TORCH = textwrap.dedent(
    """
    import sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r} (refused by the test)")
            return None

    sys.meta_path.insert(0, NoTorch())
    """
)


def run_without_torch(code: str) -> subprocess.CompletedProcess[str]:
    script = NO_TORCH + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )


def test_the_refusal_works() -> None:
    out = run_without_torch("import torch")
    assert out.returncode != 0 and "refused by the test" in out.stderr


def test_upload_path_imports_without_torch() -> None:
    out = run_without_torch(
        """
        import rankguard.probe.http_transport, rankguard.probe.upload, rankguard.probe.wire
        from rankguard.probe import CloseReport, ConfigError, ProbeConfig, read_jsonl, upload
        from rankguard.probe.transport import MemoryTransport
        from rankguard.probe.wire import encode_json
        assert ProbeConfig(every=5).jacobian_every == 50
        assert encode_json({"x": float("nan")}) == '{"x":"NaN"}'
        assert "torch" not in sys.modules
        try:
            from rankguard.probe import Probe
        except ModuleNotFoundError as exc:
            print("Probe:", exc)
        """
    )
    assert out.returncode == 0, out.stderr
    assert "Probe: No module named 'torch'" in out.stdout


def test_rankguard_upload_runs_without_torch(tmp_path: Path) -> None:
    help_out = run_without_torch(
        """
        from rankguard.server.cli import main
        main(["upload", "--help"])
        """
    )
    assert help_out.returncode == 0, help_out.stderr
    assert "usage: rankguard upload" in help_out.stdout
    # a real upload: the run file is read and sent (to a port nothing listens on)
    path = tmp_path / "run.jsonl"
    registration = {"id": "r1", "name": "offline", "config": {}, "world_size": 1}
    path.write_text(json.dumps({"v": 1, "run": registration, "points": {}}) + "\n")
    upload_out = run_without_torch(
        f"""
        from rankguard.server.cli import main
        code = main(["upload", {str(path)!r}, "--server", "http://127.0.0.1:9", "--timeout", "0.5"])
        assert "torch" not in sys.modules
        print("exit", code)
        """
    )
    assert upload_out.returncode == 0, upload_out.stderr
    assert "exit 1" in upload_out.stdout  # nothing listens: kept for a later upload
    assert f"{path}: rankguard: 1 batch(es) not delivered" in upload_out.stderr
