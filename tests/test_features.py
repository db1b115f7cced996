"""The feature browser's data (issue 17): an SAE's feature statistics computed by a job over its
dataset's rows, and a feature's page with the numbers the test computes from the cached rows."""

import time

import numpy as np
import pytest
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
    # issue 35: dead neighbours marked, the histogram's axes and the shade's scale shown
    assert page["dead_neighbours"] == [i for i, _ in page["neighbours"] if (acts[:, i] > 0).sum() == 0]
    assert html.text.count('<span class="dead">dead</span>') == len(page["dead_neighbours"])
    assert f'<b id="hist-top">{max(page["histogram_counts"]):,}</b>' in html.text
    assert f'<span>{page["histogram_edges"][-1]:.3g}</span></div>' in html.text
    assert f"to this feature's max {page['max_value']:.4g}" in html.text
    assert_page_refused(client.get(f"/saes/{sae}/features/{d_sae}"), 404, f"feature {d_sae} is out of range")
    check_the_sae_page(client, sae, rows, acts, W_dec, b_dec, tokens, vocabulary, feature, page)
    again = client.post(f"/v1/saes/{sae}/features")
    assert again.json()["status"] == "completed"  # a cache hit
    assert_refused(client.get(f"/v1/saes/{sae}/features/{d_sae}"), 404, f"feature {d_sae} is out of range")
    assert_refused(client.get(f"/v1/saes/{'0' * 24}/features/0"), 404, "unknown SAE")
    assert client.post(f"/v1/saes/{sae}/features", headers={"Authorization": ""}).status_code == 401


def assert_page_refused(response, status: int, phrase: str) -> None:
    """A browser page's error is a page with the message, not JSON and never a trace."""
    assert response.status_code == status and response.headers["content-type"].startswith("text/html"), response.text
    assert phrase in response.text and "Traceback" not in response.text, response.text


def check_the_sae_page(client, sae, rows, acts, W_dec, b_dec, tokens, vocabulary, feature, page):
    """The SAE's summary, list, search, random feature and logit lens against figures computed here."""
    from cache_server.models import ModelRegistry

    summary = client.get(f"/v1/saes/{sae}/summary").json()
    fired = (acts > 0).sum(0)
    fvu = ((acts @ W_dec + b_dec - rows).pow(2).sum() / (rows - rows.mean(0)).pow(2).sum()).item()
    assert np.isclose(summary["l0"], (acts > 0).sum().item() / 1000) and np.isclose(summary["fvu"], fvu, rtol=1e-4)
    assert summary["dead"] == int((fired == 0).sum()) and summary["dense"] == int((fired > 100).sum())
    assert sum(summary["density_counts"]) == int((fired > 0).sum()) and summary["evaluation"] is None
    listing = client.get(f"/v1/saes/{sae}/feature-list", params={"sort": "density", "limit": 1000}).json()
    assert np.allclose([f["density"] for f in listing["features"]], sorted((fired / 1000).tolist(), reverse=True))
    by_max = client.get(f"/v1/saes/{sae}/feature-list", params={"sort": "max", "order": "ascending"}).json()
    assert np.allclose([f["max_value"] for f in by_max["features"]], acts.max(0).values.sort().values.tolist(), rtol=1e-5)
    # search: features whose top examples' activating tokens contain the string
    word = vocabulary[int(tokens[page["top"][0]["row"], 0])].removeprefix("##").replace("Ġ", " ")
    found = client.get(f"/v1/saes/{sae}/feature-list", params={"q": word.upper(), "limit": 1000}).json()
    assert feature in [f["index"] for f in found["features"]] and found["total"] == len(found["features"])
    assert client.get(f"/v1/saes/{sae}/feature-list", params={"q": "qqzzqqzz"}).json()["total"] == 0
    html = client.get(f"/saes/{sae}/", params={"q": word}).text
    assert f'<b id="l0">{summary["l0"]:.1f}</b>' in html and f'<span id="matches">{found["total"]:,}</span>' in html
    assert f'href="/saes/{sae}/features/{feature}"' in html and "http" not in html
    full = client.get(f"/saes/{sae}/").text
    assert full.count(f'href="/saes/{sae}/features/') == 96 and f'<b id="dead">{summary["dead"]:,} of 96</b>' in full
    assert client.get(f"/saes/{sae}", follow_redirects=False).status_code == 308
    for _ in range(5):  # random live features, not only the strongest
        jump = client.get(f"/saes/{sae}/random", follow_redirects=False)
        assert jump.status_code == 303 and fired[int(jump.headers["location"].rsplit("/", 1)[1])] > 0
    # the logit lens: the decoder direction through the tiny causal LM's unembedding
    W_U = ModelRegistry(None, torch.device("cpu"), allow_hub=False).get(TINY).bridge.W_U.detach().float()
    logits = W_dec[feature] @ W_U
    assert [t for t, _ in page["promoted"]] == [vocabulary[i] for i in logits.topk(10).indices]
    np.testing.assert_allclose([v for _, v in page["suppressed"]], logits.topk(10, largest=False).values, atol=1e-3)
    assert page["logit_lens_note"] is None
    assert 'id="promoted"' in client.get(f"/saes/{sae}/features/{feature}").text
    assert_page_refused(client.get(f"/saes/{'0' * 24}/"), 404, "unknown SAE")
    assert_page_refused(client.get(f"/saes/{sae}/", params={"sort": "colour"}), 422, "invalid request")


def test_statistics_over_chosen_chunks(client, server):
    """A trainer's held-out chunks: the statistics cover those rows and no others; bad chunk ids get 422."""
    request = {"model": TINY, "hooks": [HOOK], "n_tokens": 1600, "context_size": 32, "dtype": "float32"}
    dataset_id = wait_job(client, client.post("/v1/harvests", json=request).json()["job_id"])["dataset_id"]
    manifest = DatasetManifest.model_validate(client.get(f"/v1/datasets/{dataset_id}").json())
    torch.manual_seed(1)
    d = manifest.hook(HOOK).d
    body = sae_body(torch.randn(d, 32) / d**0.5, torch.full((32,), -0.5), torch.randn(32, d), torch.zeros(d),
                    {"architecture": "standard"})
    sae = client.post("/v1/saes", params={"dataset_id": dataset_id, "hook": HOOK}, content=body).json()["sae_id"]
    last = manifest.n_chunks_total
    assert_refused(client.post(f"/v1/saes/{sae}/features", params={"chunks": f"1,{last}"}), 422,
                   f"chunk ids [{last}] are not chunks", f"0..{last - 1}")
    assert_refused(client.post(f"/v1/saes/{sae}/features", params={"chunks": "1;2"}), 422, "invalid request")
    job = client.post(f"/v1/saes/{sae}/features", params={"chunks": "2,1"}).json()
    assert job["chunk_ids"] == [1, 2] and job["n_rows"] == manifest.rows_in_chunk(1) + manifest.rows_in_chunk(2)
    assert wait_features(client, sae)["status"] == "completed"
    lo, hi = manifest.chunk_rows, manifest.chunk_rows + job["n_rows"]
    summary = client.get(f"/v1/saes/{sae}/summary").json()
    assert summary["chunk_ids"] == [1, 2] and summary["n_rows"] == job["n_rows"]
    for index in range(4):
        for example in client.get(f"/v1/saes/{sae}/features/{index}").json()["top"]:
            assert lo <= example["row"] < hi
    # statistics an older server stored (no top tokens for the search): asking again recomputes them
    from safetensors.torch import load_file, save_file

    (path,) = server.store.parent.rglob(f"{sae}.features.safetensors")
    save_file({k: v for k, v in load_file(path).items() if k != "top_tokens"}, path)
    assert client.post(f"/v1/saes/{sae}/features", params={"chunks": "1,2"}).json()["status"] in ("queued", "running")
    assert wait_features(client, sae)["status"] == "completed" and "top_tokens" in load_file(path)


def test_the_feature_page_escapes_every_token_string():
    """The vocabulary is untrusted text: a token that is markup shows as text, never as markup."""
    from cache_server.browser.feature_page import render
    from shared.schemas import FeatureDetail, FeatureExample

    hostile = '<script>alert("x")</script>'
    example = FeatureExample(row=5, value=2.0, tokens=["[CLS]", hostile, '"><img src=x>'], values=[0.0, 2.0, 1.0],
                             position=1)
    detail = FeatureDetail(sae_id="a" * 24, index=3, n_rows=10, density=0.1, max_value=2.0, mean_value=1.5,
                           histogram_edges=[0, 1, 2], histogram_counts=[0, 1], top=[example], intervals=[[example]],
                           neighbours=[(4, 0.5), (6, 0.2)], dead_neighbours=[6])
    html = render(detail, d_sae=8)
    assert 'features/6">feature 6</a> cosine 0.200 <span class="dead">dead</span>' in html
    assert 'features/4">feature 4</a> cosine 0.500</li>' in html
    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert 'title="&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;: 2"' in html  # the value on hover
    assert 'class="tok special"' in html  # [CLS] shown as a special token
    assert 'href="/saes/aaaaaaaaaaaaaaaaaaaaaaaa/features/2">previous' in html and "features/4\">next" in html
    # no word cut: byte-level BPE continues a word unless Ġ marks a space; WordPiece unless ## continues
    words = example.model_copy(update={"tokens": ["Ġthe", "re", "Ġend"]})
    byte_level = render(detail.model_copy(update={"top": [words], "intervals": []}), d_sae=8, byte_level=True)
    assert ">there<" not in byte_level and '> the</a><a' in byte_level and ">re</a>" in byte_level
    pieces = example.model_copy(update={"tokens": ["the", "##re", "end"]})
    # an example's window is widened to whole words at its edges (the server reads a few tokens more)
    from cache_server.saes.features import whole_words
    gpt2 = ["Ġthey", "Ġcall", "Ġit", "Ġinter", "l", "ude", ".", "Ċ", "VAL", "ERIA", ":", "Ġsome", "t", "imes", "Ġso"]
    assert whole_words(gpt2, 5, 13, byte_level=True) == (3, 14)  # "interlude" and "sometimes" whole
    assert whole_words(gpt2, 6, 11, byte_level=True) == (6, 11)  # "." and ":" cut no word
    assert whole_words(["a", "##b", "##c", "d"], 1, 2, byte_level=False) == (0, 3)
    wordpiece = render(detail.model_copy(update={"top": [pieces], "intervals": []}), d_sae=8)
    assert "> the</a>" in wordpiece and ">re</a>" in wordpiece and "> end</a>" in wordpiece
    # each token links to the features active on its row (the example's first token is row 5 - 1)
    assert 'href="/saes/aaaaaaaaaaaaaaaaaaaaaaaa/rows/4"' in wordpiece and 'href="/saes/aaaaaaaaaaaaaaaaaaaaaaaa/rows/6"' in wordpiece


def test_the_sae_list_names_each_sae_with_its_figures_and_sorts_by_them(client):
    """Issue 35: the list showed hash ids only. Now each SAE's name from its trainer, its
    architecture as people say it (ReLU, TopK k=...), L0, FVU, CE score and dead %, sortable."""
    import re

    import torch as t

    from tests.test_evaluations import HOOK, D, sae_body, wait_evaluation
    from tests.test_stored_state import HARVEST

    dataset = wait_job(client, client.post("/v1/harvests", json=HARVEST).json()["job_id"])["dataset_id"]
    g = t.Generator().manual_seed(3)
    bodies = {"relu-wide": sae_body(t.randn(D, 128, generator=g), t.zeros(128), t.randn(128, D, generator=g) * 0.1,
                                    t.zeros(D), {"architecture": "standard"}),
              "topk-8": sae_body(t.randn(D, 96, generator=g), t.zeros(96), t.randn(96, D, generator=g) * 0.1,
                                 t.zeros(D), {"architecture": "topk", "k": 8}),
              "unscored": sae_body(t.randn(D, 32, generator=g), t.zeros(32), t.randn(32, D, generator=g),
                                   t.zeros(D), {"architecture": "jumprelu"}, threshold=t.zeros(32))}
    ids = {}
    for name, body in bodies.items():
        sae = client.post("/v1/saes", params={"dataset_id": dataset, "hook": HOOK, "name": name}, content=body).json()
        assert sae["name"] == name, sae
        ids[name] = sae["sae_id"]
    again = client.post("/v1/saes", params={"dataset_id": dataset, "hook": HOOK, "name": "other"}, content=bodies["topk-8"])
    assert again.json()["name"] == "topk-8"  # the same file again is the same SAE: its first name stays
    summaries = {}
    for name in ("relu-wide", "topk-8"):
        assert client.post(f"/v1/saes/{ids[name]}/features", params={"max_rows": 256}).status_code == 202
        assert wait_features(client, ids[name])["status"] == "completed"
        summaries[name] = client.get(f"/v1/saes/{ids[name]}/summary").json()
    job = client.post("/v1/evaluations", json={"sae_id": ids["topk-8"], "n_tokens": 128}).json()
    ce = wait_evaluation(client, job["evaluation_id"])["result"]["downstream"]["ce_loss_score"]

    page = client.get("/saes/", params={"sort": "fvu"}).text
    rows = re.findall(r'<tr><td><a href="/saes/([0-9a-f]{24})/">([^<]+)</a></td><td>([^<]+)</td>'
                      r'<td class="num">([^<]+)</td><td class="num">([^<]+)</td><td class="num">([^<]+)</td>', page)
    mine = [r for r in rows if r[0] in ids.values()]
    by_fvu = sorted(("relu-wide", "topk-8"), key=lambda n: summaries[n]["fvu"]) + ["unscored"]
    assert [r[1] for r in mine] == by_fvu, mine
    cells = {r[1]: r for r in mine}
    assert cells["topk-8"][2] == "TopK k=8" and cells["relu-wide"][2] == "ReLU" and cells["unscored"][2] == "JumpReLU"
    assert float(cells["topk-8"][3]) == pytest.approx(summaries["topk-8"]["l0"], abs=0.05)
    assert cells["unscored"][3:] == ("-", "-", "-")
    assert f'<td class="num">{ce:.3f}</td>' in page
    assert client.get("/saes/", params={"sort": "bogus"}).status_code == 422
    sae_page = client.get(f"/saes/{ids['topk-8']}/").text
    assert "<title>SAE topk-8</title>" in sae_page and "<h1>SAE topk-8</h1>" in sae_page and "TopK k=8" in sae_page
