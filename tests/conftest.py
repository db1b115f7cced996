import os

import pytest

from tests.server import ServerProcess, free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOKEN = "test-secret"
TINY = "tiny-random-gpt"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real server for the suite, with a token configured, small chunks (many per dataset)."""
    store = tmp_path_factory.mktemp("server") / "store"
    proc = ServerProcess(store=store, port=free_port(), token=TOKEN,
                         env={"CACHE_SERVER_CHUNK_BYTES": str(64 * 1024)}).start()
    yield proc
    proc.stop()


@pytest.fixture()
def client(server):
    with server.client() as c:
        yield c
