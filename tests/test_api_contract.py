"""The API keeps its OpenAPI contract (issue 14): schemathesis generates requests from the
server's own /openapi.json (valid and invalid ones, with the token, examples, coverage, fuzzing
and stateful phases) and checks every answer: no 5xx, a status the document lists for the
operation, the body and headers (Allow included) it describes. Bounded: 25 examples an operation,
a fixed seed, seconds. A request may take up to two minutes (both the client's timeout and the
max_response_time check that "--checks all" runs): the first harvest of a model loads it before it
answers (8-21 s on a busy 2-core machine), past schemathesis' default of 10 s for either.

Real ids (issue 37): the store holds a dataset, an SAE with feature statistics, an evaluation, a
harvest job and a corpus before the run, and schemathesis binds them to the path, query and body
parameters most of the time (a dictionary each), so the routes are driven past their 404s, into
the stored things, their pages and deletes in any order.

Left out: schemathesis' "schema-valid request rejected", since a harvest of a model or a hook that
is not there, or a JSONL upload with no "text", is valid JSON Schema and still a 422 here."""

import json
import subprocess
import sys

import pytest

from tests.conftest import TINY, TOKEN
from tests.server import ServerProcess, free_port, wait_job
from tests.test_evaluations import HOOK, identity_body, wait_evaluation
from tests.test_features import wait_features


def _real_ids(server) -> dict[str, list]:
    """Things stored before the run, by the parameter names that take them."""
    with server.client() as client:
        job = client.post("/v1/harvests", json={"model": TINY, "hooks": [HOOK], "n_tokens": 2048, "context_size": 32}).json()
        dataset = wait_job(client, job["job_id"])["dataset_id"]
        corpus = client.post("/v1/corpora", params={"name": "notes"}, content=b"a line of text\n" * 100).json()
        sae = client.post("/v1/saes", params={"dataset_id": dataset, "hook": HOOK}, content=identity_body()).json()
        assert client.post(f"/v1/saes/{sae['sae_id']}/features", params={"max_rows": 512}).status_code == 202
        assert wait_features(client, sae["sae_id"])["status"] == "completed"
        evaluation = client.post("/v1/evaluations", json={"sae_id": sae["sae_id"], "n_tokens": 256}).json()
        assert wait_evaluation(client, evaluation["evaluation_id"])["status"] == "completed"
    return {"dataset_id": [dataset], "job_id": [job["job_id"]], "sae_id": [sae["sae_id"]],
            "evaluation_id": [evaluation["evaluation_id"]], "corpus": [corpus["corpus_id"], "default"],
            "hook": [HOOK], "name": [TINY], "index": [0, 1, 3],
            "key": ["zarr.json", f"{HOOK}/zarr.json", f"{HOOK}/c/0/0", "tokens/c/1/0"]}


def _config(ids: dict[str, list]) -> str:
    """schemathesis.toml: a dictionary of real values per parameter, used 70% of the time."""
    lines = []
    for name, values in ids.items():
        lines.append(f"[dictionaries.{name}]\nvalues = {json.dumps(values)}")
    lines.append("[parameters]")
    for name in ids:
        for where in ("path", "query", "body"):
            lines.append(f'"{where}.{name}" = {{ dictionary = "{name}", probability = 0.7 }}')
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_every_answer_is_what_the_openapi_document_says(tmp_path):
    # a server of its own: generated DELETEs must not reach other tests' datasets
    server = ServerProcess(store=tmp_path / "store", port=free_port(), token=TOKEN,
                           env={"CACHE_SERVER_CHUNK_BYTES": str(64 * 1024), "CACHE_SERVER_MAX_TOKENS": "20000"}).start()
    try:
        (tmp_path / "schemathesis.toml").write_text(_config(_real_ids(server)))
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json", "--header",
             f"Authorization: Bearer {TOKEN}", "--max-examples", "25", "--seed", "0", "--checks", "all",
             "--exclude-checks", "positive_data_acceptance", "--no-color",
             "--request-timeout", "120", "--max-response-time", "120"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failures" not in run.stdout.splitlines()[-1]


def test_cache_server_imports_point_one_way():
    """cache_server/ by concern (issue 36): corpora and store import neither each other nor anything
    above them; harvest imports those; saes imports harvest and below; none imports the routes,
    the pages, the service layer or the app."""
    import re
    from pathlib import Path

    rank = {"corpora": 1, "store": 1, "harvest": 2, "saes": 3}
    top = {"routes", "browser", "services", "app", "cli"}
    root = Path(__file__).resolve().parents[1] / "cache_server"
    wrong = []
    for concern, level in rank.items():
        for path in (root / concern).glob("*.py"):
            for other in re.findall(r"^\s*from cache_server\.([a-z_]+)", path.read_text(), re.M):
                if other in top or (other in rank and other != concern and rank[other] >= level):
                    wrong.append(f"{concern}/{path.name} imports cache_server.{other}")
    assert not wrong and len(list(root.glob("*/*.py"))) > 20, wrong
