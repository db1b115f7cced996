"""Issue 34: text a researcher chooses, through a registered SAE, as JSON and as pages: what fires
on it, the features of a stored token, steering a feature, the features a prediction rests on.
Every figure is checked against one this test computes from the model and the SAE's weights."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.schemas import DatasetManifest
from tests.conftest import TINY
from tests.server import wait_job
from tests.test_bad_input import assert_refused
from tests.test_evaluations import sae_body
from tests.test_features import assert_page_refused, wait_features
from tests.test_harvest_api import read_rows

HOOK = "blocks.1.hook_resid_post"
TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on."
D_SAE = 96


@pytest.fixture(scope="module")
def probe(server):
    """A harvest of the tiny causal LM, a ReLU SAE of random weights on its residual stream with its
    feature statistics, and the model loaded here the way the server loads it."""
    from cache_server.models import ModelRegistry

    with server.client() as client:
        request = {"model": TINY, "hooks": [HOOK], "n_tokens": 1600, "context_size": 32, "dtype": "float32"}
        dataset_id = wait_job(client, client.post("/v1/harvests", json=request).json()["job_id"])["dataset_id"]
        manifest = DatasetManifest.model_validate(client.get(f"/v1/datasets/{dataset_id}").json())
        generator = torch.Generator().manual_seed(1)
        d = manifest.hook(HOOK).d
        W_enc, b_enc = torch.randn(d, D_SAE, generator=generator) / d**0.5, torch.full((D_SAE,), -0.5)
        W_dec, b_dec = torch.randn(D_SAE, d, generator=generator), torch.zeros(d)
        sae = client.post("/v1/saes", params={"dataset_id": dataset_id, "hook": HOOK},
                          content=sae_body(W_enc, b_enc, W_dec, b_dec, {"architecture": "standard"})).json()["sae_id"]
        client.post(f"/v1/saes/{sae}/features", params={"max_rows": 800})
        assert wait_features(client, sae)["status"] == "completed"
    model = ModelRegistry(None, torch.device("cpu"), allow_hub=False).get(TINY)
    return dict(sae=sae, manifest=manifest, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, model=model)


def _ids(model, text: str) -> list[int]:
    """The text as the dataset's windows hold it: [CLS] first, then its WordPiece ids."""
    return [model.tokenizer.cls_token_id] + model.tokenizer(text, add_special_tokens=False)["input_ids"]


def _latents(p, ids: list[int]) -> torch.Tensor:
    _, cache = p["model"].bridge.run_with_cache(torch.tensor([ids]), names_filter=[HOOK])
    acts = torch.relu(cache[HOOK][0].float() @ p["W_enc"] + p["b_enc"])
    acts[0] = 0  # BOS: left alone
    return acts


def test_what_fires_on_any_text(client, probe):
    p, model = probe, probe["model"]
    ids = _ids(model, TEXT)
    acts = _latents(p, ids)
    feature = int(acts.sum(0).argmax())
    answer = client.post(f"/v1/saes/{p['sae']}/activations", json={"text": TEXT, "feature": feature, "top": 5}).json()
    assert [t["token_id"] for t in answer["tokens"]] == ids
    assert [t["token"] for t in answer["tokens"]] == model.tokenizer.convert_ids_to_tokens(ids)
    np.testing.assert_allclose(answer["values"], acts[:, feature], rtol=1e-4, atol=1e-5)
    for position, token in enumerate(answer["tokens"]):
        expected = acts[position].topk(5)
        expected = [(int(i), float(v)) for i, v in zip(expected.indices, expected.values) if v > 0]
        assert [f["feature"] for f in token["features"]] == [i for i, _ in expected]
        np.testing.assert_allclose([f["activation"] for f in token["features"]], [v for _, v in expected], rtol=1e-4)
    assert answer["tokens"][0]["features"] == []  # BOS
    stats_max = client.get(f"/v1/saes/{p['sae']}/features/{feature}").json()["max_value"]
    assert answer["feature_max"] == pytest.approx(stats_max)
    by_ids = client.post(f"/v1/saes/{p['sae']}/activations", json={"token_ids": ids, "feature": feature}).json()
    assert by_ids["values"] == answer["values"]
    # bad input: each a 4xx naming the problem
    url = f"/v1/saes/{p['sae']}/activations"
    assert_refused(client.post(url, json={}), 422, "exactly one of text and token_ids")
    assert_refused(client.post(url, json={"text": TEXT, "token_ids": ids}), 422, "exactly one of text and token_ids")
    assert_refused(client.post(url, json={"text": "word " * 40}), 422, "must be 1 to 32")
    assert_refused(client.post(url, json={"text": "x" * 9000}), 422, "at most 8000 characters")
    assert_refused(client.post(url, json={"token_ids": [10**9]}), 422, "not in the vocabulary")
    assert_refused(client.post(url, json={"text": TEXT, "feature": D_SAE}), 404, f"feature {D_SAE} is out of range")
    assert_refused(client.post(url, json={"text": TEXT, "top": 0}), 422, "top")
    assert_refused(client.post(f"/v1/saes/{'0' * 24}/activations", json={"text": TEXT}), 404, "unknown SAE")


def test_the_features_of_a_stored_token(client, probe):
    p = probe
    manifest = p["manifest"]
    rows = torch.from_numpy(read_rows(client, manifest, manifest.hook(HOOK), f"hooks/{HOOK}")[:200].astype("float32"))
    tokens = read_rows(client, manifest, manifest.tokens, "tokens")
    row = 37
    acts = torch.relu(rows[row] @ p["W_enc"] + p["b_enc"])
    answer = client.get(f"/v1/saes/{p['sae']}/rows/{row}/features", params={"top": 1000}).json()
    ranked = acts.sort(descending=True)
    assert [f["feature"] for f in answer["features"]] == ranked.indices[ranked.values > 0].tolist()
    np.testing.assert_allclose([f["activation"] for f in answer["features"]], ranked.values[ranked.values > 0], rtol=1e-4)
    spelled = p["model"].tokenizer.convert_ids_to_tokens([int(tokens[row, 0])])[0]
    assert answer["tokens"][answer["position"]] == spelled
    assert_refused(client.get(f"/v1/saes/{p['sae']}/rows/{manifest.n_items}/features"), 404, "out of range")


def _generate(p, ids: list[int], n: int, hook_fn=None) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        hooks = [] if hook_fn is None else [(HOOK, hook_fn)]
        logits = p["model"].bridge.run_with_hooks(torch.tensor([ids]), fwd_hooks=hooks)[0, -1]
        ids.append(int(logits.argmax()))
    return ids[-n:]


def test_steering_a_feature_changes_the_continuation_as_computed_here(client, probe):
    p = probe
    prompt, feature, strength = "the king said", 5, 40.0
    ids = _ids(p["model"], prompt)

    def add(activation, hook):
        out = activation.clone()
        out[:, 1:] += strength * p["W_dec"][feature]  # every position but BOS
        return out

    answer = client.post(f"/v1/saes/{p['sae']}/steer", json={"prompt": prompt, "feature": feature, "strength": strength,
                                                             "max_new_tokens": 8}).json()
    with torch.inference_mode():
        plain, steered = _generate(p, ids, 8), _generate(p, ids, 8, add)
    assert answer["unsteered"]["token_ids"] == plain and answer["steered"]["token_ids"] == steered
    assert plain != steered
    assert answer["first_difference"] == next(i for i, (a, b) in enumerate(zip(plain, steered)) if a != b)

    def clamp(activation, hook):
        a = torch.relu(activation.float() @ p["W_enc"] + p["b_enc"])[..., feature]
        out = activation.clone()
        out[:, 1:] += ((3.0 - a)[..., None] * p["W_dec"][feature])[:, 1:]
        return out

    clamped = client.post(f"/v1/saes/{p['sae']}/steer", json={"prompt": prompt, "feature": feature, "strength": 3.0,
                                                              "mode": "clamp", "max_new_tokens": 8}).json()
    with torch.inference_mode():
        assert clamped["steered"]["token_ids"] == _generate(p, ids, 8, clamp)
    url = f"/v1/saes/{p['sae']}/steer"
    assert_refused(client.post(url, json={"prompt": prompt, "feature": 0, "max_new_tokens": 65}), 422, "max_new_tokens")
    assert_refused(client.post(url, json={"prompt": prompt, "feature": 0, "strength": 1e6}), 422, "strength")
    assert_refused(client.post(url, json={"prompt": prompt, "feature": D_SAE}), 404, "out of range")
    assert_refused(client.post(url, json={"prompt": "word " * 20, "feature": 0}), 422, "with the 20 tokens to generate")


def test_attribution_of_a_prediction_is_activation_times_gradient(client, probe):
    p = probe
    ids = _ids(p["model"], TEXT)
    position = 6
    answer = client.post(f"/v1/saes/{p['sae']}/attribution", json={"text": TEXT, "position": position, "top": 500}).json()
    # by hand: the SAE's latents as leaves, the reconstruction's error added back so the pass is the model's own
    leaves = {}

    def splice(activation, hook):
        x = activation.float()
        acts = torch.relu(x.detach() @ p["W_enc"] + p["b_enc"]).requires_grad_()
        leaves["acts"] = acts
        x_hat = acts @ p["W_dec"] + p["b_dec"]
        return x_hat + (x - x_hat).detach()

    logits = p["model"].bridge.run_with_hooks(torch.tensor([ids]), fwd_hooks=[(HOOK, splice)])
    loss = -F.log_softmax(logits[0, position], -1)[ids[position + 1]]
    (grad,) = torch.autograd.grad(loss, leaves["acts"])
    scores = (leaves["acts"] * grad)[0].detach()
    scores[0] = 0
    summed = scores.sum(0)
    assert answer["loss"] == pytest.approx(float(loss.detach()), rel=1e-4)
    assert answer["target"] == p["model"].tokenizer.convert_ids_to_tokens([ids[position + 1]])[0]
    expected = summed.abs().argsort(descending=True)[: int((summed != 0).sum())]
    assert [f["feature"] for f in answer["features"]] == expected.tolist()
    np.testing.assert_allclose([f["attribution"] for f in answer["features"]], summed[expected], rtol=1e-3, atol=1e-6)
    assert answer["total"] == pytest.approx(float(summed.sum()), rel=1e-3, abs=1e-6)
    url = f"/v1/saes/{p['sae']}/attribution"
    assert_refused(client.post(url, json={"text": TEXT, "position": len(ids) - 1}), 422, "no next token to predict")


def test_the_pages_show_the_same_figures(client, probe):
    """The forms' pages, read as HTML: the same numbers as the JSON, escaped, linked."""
    sae = probe["sae"]
    answer = client.post(f"/v1/saes/{sae}/activations", json={"text": TEXT, "top": 50}).json()
    page = client.get(f"/saes/{sae}/text", params={"text": TEXT, "token": 3})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for index in [f["feature"] for f in answer["tokens"][3]["features"]]:
        assert f'<td><a href="/saes/{sae}/features/{index}">{index}</a></td>' in page.text
    assert page.text.count('class="tok') == len(answer["tokens"]) and "http" not in page.text
    hostile = '<script>alert(1)</script>'
    assert "<script>" not in client.get(f"/saes/{sae}/text", params={"text": hostile}).text
    assert "<script>" not in client.get(f"/saes/{sae}/features/0/text", params={"text": hostile}).text
    assert "<script>" not in client.get(f"/saes/{sae}/features/0/steer", params={"prompt": hostile, "tokens": 2}).text
    assert "<script>" not in client.get(f"/saes/{sae}/attribution", params={"text": hostile}).text
    assert_page_refused(client.get(f"/saes/{sae}/text", params={"text": "word " * 40}), 422, "must be 1 to 32")
    assert_page_refused(client.get(f"/saes/{sae}/features/{D_SAE}/steer"), 404, "out of range")
    assert_page_refused(client.get(f"/saes/{sae}/features/0/steer", params={"prompt": "a", "tokens": 99}), 422, "tokens")
    assert_page_refused(client.get(f"/saes/{sae}/rows/-1"), 404, "out of range")
    feature = client.get(f"/saes/{sae}/features/5")
    assert 'id="steer-form"' in feature.text and f'href="/saes/{sae}/rows/' in feature.text


def test_in_chromium_type_a_text_click_a_token_steer_and_attribute(server, probe):
    """A researcher's path through the pages in a real browser, every figure against this test's."""
    from selenium.webdriver.common.by import By

    from tests.browser import chromium, click_through, screenshot

    p, sae = probe, probe["sae"]
    ids = _ids(p["model"], TEXT)
    acts = _latents(p, ids)
    feature = int(acts.sum(0).argmax())
    with chromium() as driver:
        driver.get(f"{server.url}/saes/{sae}/features/{feature}")
        driver.find_element(By.ID, "text").send_keys(TEXT)
        click_through(driver, driver.find_element(By.CSS_SELECTOR, "#text-form button"))
        shaded = driver.find_elements(By.CSS_SELECTOR, "#shaded .tok")
        np.testing.assert_allclose([float(t.get_attribute("data-value")) for t in shaded], acts[:, feature], rtol=1e-4, atol=1e-5)
        strongest = int(acts[:, feature].argmax())
        alpha = float(shaded[strongest].value_of_css_property("background-color").rsplit(",", 1)[1].rstrip(")"))
        assert alpha > 0.05  # shaded, relative to the feature's max over the dataset's rows
        screenshot(driver, "text-feature-shading.png")
        click_through(driver, shaded[strongest])  # the token's features, on the SAE's text page
        listed = [int(a.text) for a in driver.find_elements(By.CSS_SELECTOR, "#token-features a")]
        assert listed == acts[strongest].argsort(descending=True)[: int((acts[strongest] > 0).sum())].tolist()[:50]
        assert feature in listed
        screenshot(driver, "text-token-features.png")
        click_through(driver, driver.find_element(By.CSS_SELECTOR, f'#token-features a[href="/saes/{sae}/features/{listed[1]}"]'))
        assert driver.find_element(By.TAG_NAME, "h1").text == f"Feature {listed[1]}"

        # steer from the feature's own page
        driver.get(f"{server.url}/saes/{sae}/features/5")
        driver.find_element(By.ID, "prompt").send_keys("the king said")
        click_through(driver, driver.find_element(By.CSS_SELECTOR, "#steer-form button"))
        driver.find_element(By.ID, "strength").clear()
        driver.find_element(By.ID, "strength").send_keys("40")
        driver.find_element(By.ID, "tokens").clear()
        driver.find_element(By.ID, "tokens").send_keys("8")
        click_through(driver, driver.find_element(By.CSS_SELECTOR, "#steer-form button"))

        def add(activation, hook):
            out = activation.clone()
            out[:, 1:] += 40.0 * p["W_dec"][5]
            return out

        with torch.inference_mode():
            prompt = _ids(p["model"], "the king said")
            plain, steered = _generate(p, prompt, 8), _generate(p, prompt, 8, add)
        spell = p["model"].tokenizer.convert_ids_to_tokens
        first = next(i for i, (a, b) in enumerate(zip(plain, steered)) if a != b)
        for name, expected in (("unsteered", plain), ("steered", steered)):
            shown = driver.find_elements(By.CSS_SELECTOR, f"#{name} .tok")
            assert [t.text.strip().removeprefix("##") for t in shown] == [t.removeprefix("##") for t in spell(expected)]
            assert [i for i, t in enumerate(shown) if "differs" in t.get_attribute("class")] == list(range(first, 8))
        screenshot(driver, "steering.png")

        # why the next token: from the text page's link, ranked as the JSON (checked by hand above) ranks it
        driver.get(f"{server.url}/saes/{sae}/text?text={TEXT}")
        click_through(driver, driver.find_elements(By.LINK_TEXT, "why next")[6])
        rows = driver.find_elements(By.CSS_SELECTOR, "#attribution tr")[1:]
        assert rows and driver.find_element(By.ID, "target").text.strip().removeprefix("##") == spell([ids[7]])[0].removeprefix("##")
        ranked = [int(r.find_element(By.TAG_NAME, "a").text) for r in rows]
        from_json = server.client().post(f"/v1/saes/{sae}/attribution", json={"text": TEXT, "position": 6, "top": 50}).json()
        assert ranked == [f["feature"] for f in from_json["features"]]
        screenshot(driver, "attribution.png")


def test_reads_are_answered_while_a_steering_request_runs(server, probe):
    """Model work runs on worker threads, not the event loop: reads made during a long steering
    request each answer in a fraction of its time (a blocked loop would hold one for most of it)."""
    import threading
    import time

    sae, took = probe["sae"], {}

    def steer():
        t0 = time.perf_counter()
        with server.client() as c:
            c.post(f"/v1/saes/{sae}/steer", json={"prompt": "the", "feature": 5, "max_new_tokens": 28}).raise_for_status()
        took["steer"] = time.perf_counter() - t0

    thread = threading.Thread(target=steer)
    latencies = []
    with server.client() as client:
        client.get(f"/v1/saes/{sae}")  # connected before the race starts
        thread.start()
        while thread.is_alive():
            t0 = time.perf_counter()
            assert client.get(f"/v1/saes/{sae}").status_code == 200
            latencies.append(time.perf_counter() - t0)
        thread.join()
    assert len(latencies) >= 3 and max(latencies) < took["steer"] / 2, (latencies, took)
