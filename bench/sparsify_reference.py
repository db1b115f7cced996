"""Reference TopK SAEs and transcoders from EleutherAI's sparsify: train one ``SparseCoder`` (an SAE
on rows from an .npy file; with ``--train-y``, a transcoder with ``transcode``, and
``skip_connection`` if asked, on input / target rows) with sparsify's own step, then print its
held-out FVU, dead and silent shares and tokens/s as one JSON line, and write its weights in
SAELens' layout on the rows' units (the caller folds its scales in).

It runs in its own virtual environment, never the project's .venv:

    python3 -m venv /work/sparsify-venv
    /work/sparsify-venv/bin/pip install torch==2.13.0
    /work/sparsify-venv/bin/pip install eai-sparsify==1.3.3 torch==2.13.0

The step is sparsify 1.3.3's Trainer's, at its defaults: SignSGD under its schedule-free wrapper
(momentum 0.95, lr 5e-3 / sqrt(num_latents / 2^14), no LR schedule, evaluated at the averaged
weights), loss = FVU of the batch, no AuxK (auxk_alpha 0). An SAE: decoder rows the encoder's,
renormalised to unit norm before every step's forward and the gradient parallel to each removed
before the step, b_dec at the first batch's mean. A transcoder: decoder from zero and not
normalised, b_dec at the first batch's target mean and the encoder bias centring its inputs. Where this loop differs from its Trainer: the rows come from the files (already
shuffled), not from its own forward passes over a Hugging Face dataset; one batch per step (no
gradient accumulation, one process).
"""

import argparse
import json
import sys
import time

import numpy as np
import torch
from safetensors.torch import save_file
from schedulefree import ScheduleFreeWrapper
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.sign_sgd import SignSGD


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("train-x", "eval-x", "out"):
        p.add_argument(f"--{name}", required=True)
    for name in ("train-y", "eval-y"):
        p.add_argument(f"--{name}", help="a transcoder's targets (none: an SAE)")
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--d-sae", type=int, required=True)
    p.add_argument("--skip", action="store_true")
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    transcode = args.train_y is not None
    x = torch.from_numpy(np.load(args.train_x))
    y = torch.from_numpy(np.load(args.train_y)) if transcode else x
    cfg = SparseCoderConfig(num_latents=args.d_sae, k=args.k, transcode=transcode, skip_connection=args.skip)
    sae = SparseCoder(x.shape[1], cfg)
    params = [{"params": sae.parameters(), "lr": 5e-3 / (sae.num_latents / 2**14) ** 0.5}]
    optimizer = ScheduleFreeWrapper(SignSGD(params), momentum=0.95)
    optimizer.train()
    steps = args.tokens // args.batch_size
    fired = torch.zeros(sae.num_latents, dtype=torch.bool)
    started = time.perf_counter()
    for step in range(steps):
        lo = step * args.batch_size % (x.shape[0] - args.batch_size + 1)
        inputs, outputs = x[lo : lo + args.batch_size], y[lo : lo + args.batch_size]
        if step == 0:  # its Trainer's first-step initialisation
            with torch.no_grad():
                if transcode:
                    sae.encoder.bias.data = -inputs.mean(0) @ sae.encoder.weight.data.T
                sae.b_dec.data = outputs.mean(0)
        if not transcode:
            sae.set_decoder_norm_to_unit_norm()
        out = sae(inputs, outputs if transcode else None)
        out.fvu.backward()
        if not transcode:
            sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
    rate = steps * args.batch_size / (time.perf_counter() - started)
    optimizer.eval()  # the averaged weights, as its Trainer saves them
    with torch.no_grad():
        ex = torch.from_numpy(np.load(args.eval_x))
        ey = torch.from_numpy(np.load(args.eval_y)) if transcode else ex
        pred = sae(ex, ey if transcode else None).sae_out
        fvu = float(((pred - ey) ** 2).sum() / ((ey - ey.mean(0)) ** 2).sum())
        for part in (ex, x):
            for lo in range(0, part.shape[0], 8192):
                fired[sae.encode(part[lo : lo + 8192]).top_indices.flatten()] = True
            if part is ex:
                silent = 100 * float((~fired).float().mean())
        state = {"W_enc": sae.encoder.weight.T.contiguous(), "b_enc": sae.encoder.bias.clone(),
                 "W_dec": sae.W_dec.clone(), "b_dec": sae.b_dec.clone()}
        if args.skip:
            state["W_skip"] = sae.W_skip.clone()  # x @ W_skip.mT: SAELens' [d_out, d_in] already
    save_file(state, args.out)
    print(json.dumps({"l0": float(args.k), "fvu": fvu, "dead_pct": 100 * float((~fired).float().mean()),
                      "silent_pct": silent, "tokens_per_second": rate, "steps": steps}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
