import os

import pytest

from tests.server import ServerProcess, free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under ``pytest -n 2`` each worker (and every process it starts, which inherits this) keeps to
    # one core: two workers each spinning two torch threads on a 2-core machine lose to one each.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

TOKEN = "test-secret"
TINY = "tiny-random-gpt"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real server for the suite, with a token configured, small chunks (many per dataset)."""
    store = tmp_path_factory.mktemp("server") / "store"
    proc = ServerProcess(store=store, port=free_port(), token=TOKEN,
                         env={"CACHE_SERVER_CHUNK_BYTES": str(64 * 1024), "CACHE_SERVER_MAX_CORPUS_BYTES": str(64 << 20)}).start()
    yield proc
    proc.stop()


@pytest.fixture()
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="session")
def bucket():
    """A real S3 wire protocol on 127.0.0.1 (moto's server) with a bucket "acts": (env, boto3 client)."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    s3.create_bucket(Bucket="acts")
    yield env, s3
    moto.stop()
