"""What a newcomer meets when the server cannot start: one clear line and a non-zero exit."""

import socket
import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cache_server", *args], capture_output=True, text=True, timeout=120)


def test_port_already_in_use(tmp_path):
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # listening: taken all the same
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("--store", str(tmp_path / "store"), "--port", str(port))
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_store_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("--store", str(blocker / "store"))
    assert result.returncode == 1
    assert "cannot create store folder" in result.stderr and "Traceback" not in result.stderr


def test_bad_setting_value(tmp_path):
    result = run_cli("--store", str(tmp_path), "--port", "not-a-port")
    assert result.returncode == 2 and "--port" in result.stderr and "Traceback" not in result.stderr


def test_a_bad_token_or_ray_setting_is_one_line(tmp_path):
    for args, setting in ((["--ray-workers", "0"], "ray_workers=0"), (["--ray-worker-cpus", "0"], "ray_worker_cpus=0.0"),
                          (["--token", "clé secrète"], "token='clé secrète'")):  # no HTTP header carries it
        result = run_cli("--store", str(tmp_path), *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"cache-server: error: bad setting {setting}")
        assert len(result.stderr.strip().splitlines()) == 1


def test_a_device_torch_does_not_know_or_this_machine_lacks_is_refused_at_start_up(tmp_path):
    """Not a traceback, and not a server that starts and then fails every harvest (issue 16)."""
    import torch

    cases = [("tpu", "device 'tpu' is not one of auto, cpu, cuda, cuda:N"),
             ("cpu:0x", "device 'cpu:0x' is not one of")]
    if not torch.cuda.is_available():
        cases.append(("cuda", "torch sees no CUDA device"))
    for device, message in cases:
        result = run_cli("--store", str(tmp_path / "store"), "--device", device)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cache-server: error: --device:") and message in lines[0], lines


def test_a_port_just_left_by_a_stopped_server_is_free():
    """A restarted server finds its port's last connections in TIME_WAIT; uvicorn can bind it, so
    the start-up check must not call it taken."""
    from cache_server.cli import _check_port

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's (asyncio's) listener
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            served, _ = listener.accept()
            served.close()  # the server's side closes first: its end of the connection waits in TIME_WAIT
            client.recv(1)
    assert _check_port("127.0.0.1", port) is None


def test_a_second_server_on_a_store_in_use_refuses_to_start(tmp_path):
    """Two lone servers on one store would harvest the same dataset twice and delete under each
    other (issue 14): the second one says who holds it; the lock dies with its holder."""
    from tests.server import ServerProcess, free_port

    store = tmp_path / "store"
    first = ServerProcess(store=store, port=free_port()).start()
    try:
        second = run_cli("--store", str(store), "--port", str(free_port()), "--no-hub")
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert second.stderr.strip() == (f"cache-server: error: another cache server is using the store {store} "
                                         f"(pid {first.process.pid}); stop it, or give this one its own --store "
                                         "(or --state-dir beside a bucket); to harvest on several machines, use "
                                         "--ray-address")
    finally:
        first.kill()  # a crash: the kernel lets go of the lock
    again = ServerProcess(store=store, port=free_port()).start()
    again.stop()
