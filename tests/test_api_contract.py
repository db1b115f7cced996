"""The API keeps its OpenAPI contract (issue 14): schemathesis generates requests from the
server's own /openapi.json (valid and invalid ones, with the token, examples, coverage, fuzzing
and stateful phases) and checks every answer: no 5xx, a status the document lists for the
operation, the body and headers (Allow included) it describes. Bounded: 40 examples an operation,
a fixed seed, seconds. A request may take up to two minutes (both the client's timeout and the
max_response_time check that "--checks all" runs): the first harvest of a model loads it before it
answers (8-21 s on a busy 2-core machine), past schemathesis' default of 10 s for either.

Left out: schemathesis' "schema-valid request rejected", since a harvest of a model or a hook that
is not there, or a JSONL upload with no "text", is valid JSON Schema and still a 422 here."""

import subprocess
import sys

from tests.conftest import TOKEN
from tests.server import ServerProcess, free_port


def test_every_answer_is_what_the_openapi_document_says(tmp_path):
    # a server of its own: generated DELETEs must not reach other tests' datasets
    server = ServerProcess(store=tmp_path / "store", port=free_port(), token=TOKEN,
                           env={"CACHE_SERVER_CHUNK_BYTES": str(64 * 1024), "CACHE_SERVER_MAX_TOKENS": "20000"}).start()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json", "--header",
             f"Authorization: Bearer {TOKEN}", "--max-examples", "40", "--seed", "0", "--checks", "all",
             "--exclude-checks", "positive_data_acceptance", "--no-color",
             "--request-timeout", "120", "--max-response-time", "120"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failures" not in run.stdout.splitlines()[-1]
