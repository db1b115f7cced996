"""The feature browser's data (issue 17): an SAE's feature statistics computed by a job over its
dataset's rows, and a feature's page with the numbers the test computes from the cached rows."""

import time

import numpy as np
import torch

from shared.codec import to_torch
from shared.schemas import DatasetManifest
from tests.conftest import TINY
from tests.server import wait_job
from tests.test_bad_input import assert_refused
from tests.test_evaluations import sae_body
from tests.test_harvest_api import read_rows

HOOK = "blocks.1.hook_resid_post"


def wait_features(client, sae_id: str) -> dict:
    deadline = time.monotonic() + 300
    while (job := client.get(f"/v1/saes/{sae_id}/features").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return job


def test_a_features_page_shows_what_the_cached_rows_say(client):
    request = {"model": TINY, "hooks": [HOOK], "n_tokens": 1600, "context_size": 32, "dtype": "float32"}
    dataset_id = wait_job(client, client.post("/v1/harvests", json=request).json()["job_id"])["dataset_id"]
    manifest = DatasetManifest.model_validate(client.get(f"/v1/datasets/{dataset_id}").json())
    torch.manual_seed(0)
    d, d_sae = manifest.hook(HOOK).d, 96
    W_enc, b_enc = torch.randn(d, d_sae) / d**0.5, torch.full((d_sae,), -1.0)
    W_dec, b_dec = torch.randn(d_sae, d), torch.zeros(d)
    sae = client.post("/v1/saes", params={"dataset_id": dataset_id, "hook": HOOK},
                      content=sae_body(W_enc, b_enc, W_dec, b_dec, {"architecture": "standard"})).json()["sae_id"]
    assert_refused(client.get(f"/v1/saes/{sae}/features"), 404, "no feature statistics yet", "POST")
    job = client.post(f"/v1/saes/{sae}/features", params={"max_rows": 1000})
    assert job.status_code == 202 and job.json()["n_rows"] == 1000
    done = wait_features(client, sae)
    assert done["status"] == "completed" and done["rows_done"] == 2000, done

    rows = to_torch(read_rows(client, manifest, manifest.hook(HOOK), f"hooks/{HOOK}"), "float32")[:1000]
    tokens = read_rows(client, manifest, manifest.tokens, "tokens")
    acts = torch.relu(rows @ W_enc + b_enc)
    vocabulary = client.get(f"/v1/datasets/{dataset_id}/vocabulary").json()
    feature = int((acts > 0).sum(0).argmax())
    page = client.get(f"/v1/saes/{sae}/features/{feature}").json()
    a = acts[:, feature]
    assert page["n_rows"] == 1000 and page["density"] == int((a > 0).sum()) / 1000
    assert np.isclose(page["max_value"], a.max().item(), rtol=1e-5)
    # the 20 strongest (BOS rows tie: any of them), each row's own activation
    np.testing.assert_allclose([e["value"] for e in page["top"]], a.sort(descending=True).values[:20], rtol=1e-5)
    np.testing.assert_allclose([a[e["row"]].item() for e in page["top"]], [e["value"] for e in page["top"]], rtol=1e-5)
    for example in page["top"][:3]:
        row, at = example["row"], example["position"]
        assert example["tokens"][at] == vocabulary[int(tokens[row, 0])]
        assert np.isclose(example["values"][at], a[row].item(), rtol=1e-4)
        assert tokens[row - at, 1] == tokens[row, 1]  # the context stays in the row's sequence
    assert sum(page["histogram_counts"]) == int((a > 0).sum()) and len(page["histogram_edges"]) == 51
    for q, sample in enumerate(page["intervals"]):
        for e in sample:
            assert q / 10 * a.max().item() <= e["value"] * (1 + 1e-6) and e["value"] <= (q + 1) / 10 * a.max().item() * (1 + 1e-6)
    cosine = torch.nn.functional.normalize(W_dec, dim=1) @ torch.nn.functional.normalize(W_dec, dim=1)[feature]
    cosine[feature] = -2
    assert [i for i, _ in page["neighbours"]] == cosine.topk(10).indices.tolist()
    html = client.get(f"/saes/{sae}/features/{feature}")
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert f'<b id="density">{page["density"]:.4%}</b>' in html.text and "http" not in html.text  # no CDN
    assert html.text.count('class="example"') == len(page["top"]) + sum(map(len, page["intervals"]))
    for i, _ in page["neighbours"]:
        assert f'href="/saes/{sae}/features/{i}"' in html.text
    assert_refused(client.get(f"/saes/{sae}/features/{d_sae}"), 404, f"feature {d_sae} is out of range")
    again = client.post(f"/v1/saes/{sae}/features")
    assert again.json()["status"] == "completed"  # a cache hit
    assert_refused(client.get(f"/v1/saes/{sae}/features/{d_sae}"), 404, f"feature {d_sae} is out of range")
    assert_refused(client.get(f"/v1/saes/{'0' * 24}/features/0"), 404, "unknown SAE")
    assert client.post(f"/v1/saes/{sae}/features", headers={"Authorization": ""}).status_code == 401


def test_the_feature_page_escapes_every_token_string():
    """The vocabulary is untrusted text: a token that is markup shows as text, never as markup."""
    from cache_server.browser.feature_page import render
    from shared.schemas import FeatureDetail, FeatureExample

    hostile = '<script>alert("x")</script>'
    example = FeatureExample(row=5, value=2.0, tokens=["[CLS]", hostile, '"><img src=x>'], values=[0.0, 2.0, 1.0],
                             position=1)
    detail = FeatureDetail(sae_id="a" * 24, index=3, n_rows=10, density=0.1, max_value=2.0, mean_value=1.5,
                           histogram_edges=[0, 1, 2], histogram_counts=[0, 1], top=[example], intervals=[[example]],
                           neighbours=[(4, 0.5)])
    html = render(detail, d_sae=8)
    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert 'title="&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;: 2"' in html  # the value on hover
    assert 'class="tok special"' in html  # [CLS] shown as a special token
    assert 'href="/saes/aaaaaaaaaaaaaaaaaaaaaaaa/features/2">previous' in html and "features/4\">next" in html
