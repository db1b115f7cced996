"""Reference figures from SAELens: train one SAELens SAE on activation rows from .npy files, then
print its held-out L0 / FVU, its dead share (never fired on any training or held-out row) and
silent share (never fired on the held-out rows) as one JSON line (all other logging on stderr).

It runs in its own virtual environment, never the project's .venv (the CPU torch wheel first, so
that sae-lens does not pull a CUDA build):

    python3 -m venv /work/saelens-venv
    /work/saelens-venv/bin/pip install torch==2.13.0
    /work/saelens-venv/bin/pip install sae-lens==6.54.12 torch==2.13.0

    /work/saelens-venv/bin/python bench/saelens_reference.py --train TRAIN.npy --eval EVAL.npy \
        --arch topk --k 32 --tokens 20480000 --batch-size 4096 --lr 4e-4 --d-sae 3072 --seed 0

TRAIN/EVAL are float32 [rows, d_in], already normalised and (train) shuffled. Training uses
SAELens' own v6 pieces: the *TrainingSAEConfig / *TrainingSAE of the architecture and SAETrainer
fed by a plain iterator of batches. Every SAELens default that no flag names is left alone (Adam
betas, decoder_init_norm, aux losses, dead_feature_window, rescale_acts_by_decoder_norm, the
trainer's fixed grad-norm clip of 1.0). Nothing goes to wandb, no checkpoint is written.
"""

import argparse
import json
import os
import sys
import tempfile
import time

for var, value in (("WANDB_MODE", "disabled"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")):
    os.environ.setdefault(var, value)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sae_lens import SAE  # noqa: E402
from sae_lens.config import LoggingConfig, SAETrainerConfig  # noqa: E402
from sae_lens.registry import get_sae_training_class  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402

K_ARCHS = ("topk", "batchtopk", "matryoshka_batchtopk")
COEFFICIENT_FIELD = {"standard": "l1", "jumprelu": "l0"}  # <name>_coefficient, <name>_warm_up_steps


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--arch", required=True, choices=("standard", "jumprelu") + K_ARCHS)
    p.add_argument("--k", type=float, help="active latents (topk archs); SAELens' default if omitted")
    p.add_argument("--coefficient", type=float, help="l1 (standard) / l0 (jumprelu) coefficient")
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--d-sae", type=int, default=3072)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr-warmup-steps", type=int, default=0)
    p.add_argument("--lr-decay-steps", type=int, default=0)
    p.add_argument("--coefficient-warmup-steps", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--save", help="a folder to keep the inference model in (SAELens' cfg.json and sae_weights.safetensors)")
    return p.parse_args()


def sae_config(args: argparse.Namespace, d_in: int):
    """The architecture's own SAELens training config, with only the flags' fields set."""
    _, cfg_cls = get_sae_training_class(args.arch)
    fields = dict(d_in=d_in, d_sae=args.d_sae, dtype="float32", device="cpu", normalize_activations="none")
    if args.arch in K_ARCHS:
        if args.k is not None:
            fields["k"] = int(args.k) if args.arch == "topk" else args.k
        if args.arch == "matryoshka_batchtopk":  # SAELens has no default widths: it requires them
            fields["matryoshka_widths"] = [args.d_sae // 8, args.d_sae // 4, args.d_sae // 2, args.d_sae]
    else:
        name = COEFFICIENT_FIELD[args.arch]
        if args.coefficient is not None:
            fields[f"{name}_coefficient"] = args.coefficient
        fields[f"{name}_warm_up_steps"] = args.coefficient_warmup_steps
    return cfg_cls(**fields)


def cycling_batches(rows: np.ndarray, batch_size: int):
    """Train rows in file order, batch_size at a time, wrapping to the start (a batch may straddle)."""
    start, n = 0, len(rows)
    while True:
        idx = (start + np.arange(batch_size)) % n if start + batch_size > n else slice(start, start + batch_size)
        yield torch.from_numpy(np.array(rows[idx], dtype=np.float32))
        start = (start + batch_size) % n


@torch.no_grad()
def fired_on(sae, rows: np.ndarray, batch_size: int) -> torch.Tensor:
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for i in range(0, len(rows), batch_size):
        fired |= (sae.encode(torch.from_numpy(np.array(rows[i:i + batch_size], dtype=np.float32))) != 0).any(0)
    return fired


@torch.no_grad()
def held_out(sae, rows: np.ndarray, batch_size: int) -> dict:
    mean = torch.zeros(rows.shape[1], dtype=torch.float64)
    for i in range(0, len(rows), batch_size):
        mean += torch.from_numpy(np.array(rows[i:i + batch_size], dtype=np.float64)).sum(0)
    mean /= len(rows)
    sq_err = total_var = active = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for i in range(0, len(rows), batch_size):
        x = torch.from_numpy(np.array(rows[i:i + batch_size], dtype=np.float32))
        acts = sae.encode(x)
        xhat = sae.decode(acts)
        nonzero = acts != 0
        active += nonzero.sum().item()
        fired |= nonzero.any(0)
        sq_err += (xhat.double() - x.double()).pow(2).sum().item()
        total_var += (x.double() - mean).pow(2).sum().item()
    return {"l0": active / len(rows), "fvu": sq_err / total_var,
            "silent_pct": 100.0 * (~fired).sum().item() / sae.cfg.d_sae, "fired": fired}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_rows = np.load(args.train, mmap_mode="r")
    eval_rows = np.load(args.eval, mmap_mode="r")
    cfg = sae_config(args, d_in=train_rows.shape[1])
    log(f"SAELens config: {cfg}")

    torch.manual_seed(args.seed)
    sae_cls, _ = get_sae_training_class(args.arch)
    sae = sae_cls(cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.tokens, train_batch_size_samples=args.batch_size, lr=args.lr,
        lr_end=args.lr / 10,  # what SAELens' LLM runner config fills in (unused by "constant")
        lr_warm_up_steps=args.lr_warmup_steps, lr_decay_steps=args.lr_decay_steps, device="cpu",
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=cycling_batches(train_rows, args.batch_size))

    t0 = time.perf_counter()
    trainer.fit()
    train_seconds = time.perf_counter() - t0
    log(f"trained {trainer.n_training_steps} steps / {trainer.n_training_samples} rows in {train_seconds:.2f}s; "
        f"SAELens' last-window train L0 {sae.cfg.metadata.l0}, dead {sae.cfg.metadata.num_dead_features}")
    if hasattr(sae, "topk_threshold"):
        log(f"batchtopk threshold (exported as every latent's JumpReLU threshold): {sae.topk_threshold.item():.6g}")

    # Inference form: save_inference_model + SAE.load_from_disk, i.e. exactly what SAELens writes at the
    # end of a run. topk -> TopKSAE (decoder norms folded in); batchtopk and matryoshka_batchtopk ->
    # JumpReLUSAE with topk_threshold as every latent's threshold; standard / jumprelu -> their own class.
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(args.save or tmp)
        inference_sae = SAE.load_from_disk(args.save or tmp, device="cpu")
    inference_sae.eval()
    log(f"evaluating as {type(inference_sae).__name__} on {len(eval_rows)} held-out rows")
    figures = held_out(inference_sae, eval_rows, args.batch_size)
    # dead: never fired on any row, training or held-out (bench/quality.py counts this project's alike)
    fired = figures.pop("fired") | fired_on(inference_sae, train_rows, args.batch_size)
    figures["dead_pct"] = 100.0 * (~fired).sum().item() / sae.cfg.d_sae

    coefficient = None
    if args.arch in COEFFICIENT_FIELD:
        coefficient = getattr(cfg, f"{COEFFICIENT_FIELD[args.arch]}_coefficient")
    print(json.dumps({"arch": args.arch, "k": getattr(cfg, "k", None), "coefficient": coefficient, **figures,
                      "train_seconds": train_seconds,
                      "tokens_per_second": trainer.n_training_samples / train_seconds}), flush=True)


if __name__ == "__main__":
    main()
