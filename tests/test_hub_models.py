"""Hub models (issue 14): a dataset's identity is the revision the hub resolved, and a hub name
never loads a folder that happens to sit in the server's working directory. The hub here is its
local cache (HF_HUB_CACHE, offline), laid out as huggingface_hub lays it out."""

import shutil
import time

from cache_server.models import _shakespeare_gpt_path
from tests.server import ServerProcess, free_port, wait_job

NAME = "org/tiny-shakespeare"
REQUEST = {"model": NAME, "hooks": ["blocks.1.hook_resid_post"], "n_tokens": 1024, "context_size": 64}


def publish(cache, name: str, commit: str) -> None:
    """What a download of ``name`` at ``commit`` leaves in the hub cache."""
    repo = cache / f"models--{name.replace('/', '--')}"
    shutil.copytree(_shakespeare_gpt_path(), repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def harvest(tmp_path, cache, request=REQUEST, offline=True, within: float | None = None):
    """Harvest on a server of its own; ``within``: the submit must be answered in that many seconds."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    # online: the hub is a closed port here, as when it is unreachable
    env = {"HF_HUB_OFFLINE": "1"} if offline else {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    server = ServerProcess(store=tmp_path / "store", port=free_port(), hub=True, cwd=work,
                           env={"HF_HUB_CACHE": str(cache), **env}).start()
    try:
        # A submit loads the model: 13 s on a busy 2-core machine (a 10 s timeout failed there).
        with server.client(timeout=120) as client:
            started = time.monotonic()
            answer = client.post("/v1/harvests", json=request)
            assert within is None or time.monotonic() - started < within, time.monotonic() - started
            if answer.status_code != 202:
                return answer
            wait_job(client, answer.json()["job_id"])
            return client.get(f"/v1/datasets/{answer.json()['dataset_id']}").json()
    finally:
        server.stop()


def test_a_hub_model_is_identified_by_its_revision(tmp_path):
    cache = tmp_path / "hub"
    (tmp_path / "work").mkdir()
    publish(cache, NAME, "a" * 40)
    first = harvest(tmp_path, cache)
    assert first["model"]["fingerprint"] == f"hub:{NAME}@{'a' * 40}" and first["complete"]
    publish(cache, NAME, "b" * 40)  # new weights upstream, downloaded
    second = harvest(tmp_path, cache)
    assert second["model"]["fingerprint"] == f"hub:{NAME}@{'b' * 40}"
    assert second["dataset_id"] != first["dataset_id"]  # not the stale cache


def test_a_hub_name_never_loads_a_folder_in_the_working_directory(tmp_path):
    cache = tmp_path / "hub"
    cache.mkdir()
    for name in ("evilmodel", "org/evil2"):
        shutil.copytree(_shakespeare_gpt_path(), tmp_path / "work" / name)
        answer = harvest(tmp_path, cache, {**REQUEST, "model": name})
        assert answer.status_code == 422, answer
        assert "must not name a folder" in answer.json()["detail"] and "--models-dir" in answer.json()["detail"]


def test_with_the_hub_unreachable_a_cached_model_loads_and_another_name_fails_fast(tmp_path):
    cache = tmp_path / "hub"
    publish(cache, NAME, "c" * 40)
    cached = harvest(tmp_path, cache, offline=False)
    assert cached["model"]["fingerprint"] == f"hub:{NAME}@{'c' * 40}" and cached["complete"]
    # fast: transformers' own retries took 25 s (0.5 s here)
    answer = harvest(tmp_path, cache, {**REQUEST, "model": "org/not-cached"}, offline=False, within=10)
    assert answer.status_code == 422
    for phrase in ("unknown model 'org/not-cached'", "not in the local hub cache", "the hub did not answer",
                   "--models-dir", "--no-hub"):
        assert phrase in answer.json()["detail"], answer.json()["detail"]
