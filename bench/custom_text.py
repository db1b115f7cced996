"""Custom text through a registered SAE, over HTTP, against the bare forward pass on the same tokens.

A real server (``LocalServer``, as ``sae-pipeline`` starts it) holds a harvest of the built-in
model and a TopK SAE (d_sae 8 x d_model, random weights: the cost does not depend on them). Timed,
each the median of ``--repeats`` calls after one warm-up: (a) the bare forward pass of the model in
this process on the text's tokens (logits); (b) ``POST /v1/saes/{id}/activations`` with that text
(tokenize, run to the hook, encode, top features per token, JSON); (c) ``POST .../attribution``
(a forward and a backward pass); (d) ``POST .../steer`` with 20 new tokens, greedy (two
continuations: 40 forward passes).

    python bench/custom_text.py [--model shakespeare-gpt] [--hook blocks.2.hook_resid_post] [--tokens 128]
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cache_server.models import ModelRegistry  # noqa: E402
from trainer.data.local_server import LocalServer  # noqa: E402


def median_seconds(call, repeats: int) -> float:
    call()  # warm-up: the model loads, caches fill
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shakespeare-gpt")
    parser.add_argument("--hook", default="blocks.2.hook_resid_post")
    parser.add_argument("--tokens", type=int, default=128, help="the text's tokens, BOS included")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    model = ModelRegistry(None, torch.device("cpu"), allow_hub=False).get(args.model)
    words = ("Now is the winter of our discontent made glorious summer by this sun of York; " * 40).split(" ")
    text = " ".join(words[: args.tokens])
    while len(model.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 > args.tokens:
        text = text.rsplit(" ", 1)[0]
    ids = torch.tensor([[model.bos_token_id] + model.tokenizer(text, add_special_tokens=False)["input_ids"]])

    with tempfile.TemporaryDirectory() as tmp, LocalServer(Path(tmp) / "store") as server, \
            httpx.Client(base_url=server.url, timeout=600) as client:
        request = {"model": args.model, "hooks": [args.hook], "n_tokens": 4 * args.tokens, "context_size": args.tokens}
        job = client.post("/v1/harvests", json=request).json()
        while (state := client.get(f"/v1/harvests/{job['job_id']}").json())["status"] in ("queued", "running"):
            time.sleep(0.2)
        d = model.info.d_model
        d_sae = 8 * d
        weights = {"W_enc": torch.randn(d, d_sae) / d**0.5, "b_enc": torch.zeros(d_sae),
                   "W_dec": torch.randn(d_sae, d) / d**0.5, "b_dec": torch.zeros(d)}
        cfg = {"architecture": "topk", "k": 32, "d_in": d, "d_sae": d_sae, "metadata": {"hook_name": args.hook}}
        sae = client.post("/v1/saes", params={"dataset_id": state["dataset_id"], "hook": args.hook},
                          content=save(weights, metadata={"cfg": json.dumps(cfg)})).json()["sae_id"]

        def post(path: str, body: dict):
            return lambda: client.post(f"/v1/saes/{sae}/{path}", json=body).raise_for_status()

        with torch.inference_mode():
            bare = median_seconds(lambda: model.bridge(ids), args.repeats)
        activations = median_seconds(post("activations", {"text": text, "top": 5}), args.repeats)
        attribution = median_seconds(post("attribution", {"text": text}), args.repeats)
        steer = median_seconds(post("steer", {"prompt": "Now is the winter", "feature": 0, "max_new_tokens": 20}),
                               max(1, args.repeats // 5))
    print(f"{args.model} {args.hook}, {ids.shape[1]} tokens, TopK d_sae {d_sae}, median of {args.repeats}")
    print(f"(a) bare forward pass        {1000 * bare:8.1f} ms")
    print(f"(b) POST activations         {1000 * activations:8.1f} ms   (b)/(a) = {activations / bare:.2f}")
    print(f"(c) POST attribution         {1000 * attribution:8.1f} ms   (c)/(a) = {attribution / bare:.2f}")
    print(f"(d) POST steer, 20 tokens    {1000 * steer:8.1f} ms   (d)/(a) = {steer / bare:.2f} (40 forward passes)")


if __name__ == "__main__":
    main()
