"""This project's transcoder and sparsify's ``SparseCoder`` in lockstep: the same initial weights, the
same batches in the same order, each with its own module and loss, and the step asked for; prints
both batch FVUs every 10 steps and the held-out FVU of each at the end. A gap here is in the module
(its parametrisation, its gradients), not in the data, the init or the step: this is how the
fixed input centring of the transcoders was found to cost a quarter of their FVU (docs/benchmarks.md).

Runs in sparsify's venv (bench/sparsify_reference.py's docstring) with this repo importable:

    /work/sparsify-venv/bin/pip install jaxtyping pydantic
    .venv/bin/python bench/transcoders.py --save-rows /tmp/rows
    /work/sparsify-venv/bin/python bench/sparsify_lockstep.py --rows /tmp/rows [--k 16] [--skip]
        [--optimizer signsgd|schedulefree_adam|adam --lr LR] [--centred]

sparsify runs its Trainer's step (SignSGD under the schedule-free wrapper, lr 5e-3 / sqrt(d_sae /
2^14), FVU loss) from its own init (``nn.Linear``'s encoder, the decoder from zero, the encoder
bias centring the first batch's inputs, ``b_dec`` its targets' mean); this project's transcoder
(``decoder_init = "zeros"``, the same init copied in) trains on its own loss (``sae_loss``) with
``--optimizer`` (default: sparsify's step and lr), no clipping, resampling, AuxK or refit.
``--centred`` feeds this project's module rows less the first batch's input mean, with a bias of
zero: the parametrisation it had before (a fixed mean subtracted; exact without ``--skip``).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from schedulefree import ScheduleFreeWrapper
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.sign_sgd import SignSGD

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.config import SAEConfig  # noqa: E402
from trainer.sae.autoencoder import SparseAutoencoder  # noqa: E402
from trainer.sae.objectives import sae_loss  # noqa: E402
from trainer.training.optimizers import at_average, make_optimizer  # noqa: E402

D_SAE, BATCH = 1536, 4096
SPARSIFY_LR = 5e-3 / (D_SAE / 2**14) ** 0.5


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=Path, required=True, help="a folder from bench/transcoders.py --save-rows")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--skip", action="store_true")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--optimizer", choices=("signsgd", "schedulefree_adam", "adam"), default="signsgd")
    p.add_argument("--lr", type=float, default=SPARSIFY_LR)
    p.add_argument("--centred", action="store_true", help="this project's module on rows less the input mean")
    return p.parse_args()


def fvu(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float(((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def main() -> None:
    a = parse_args()
    x, y, ex, ey = (torch.from_numpy(np.load(a.rows / f"{n}.npy")) for n in ("train_x", "train_y", "eval_x", "eval_y"))
    torch.manual_seed(0)
    theirs = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=D_SAE, k=a.k, transcode=True, skip_connection=a.skip))
    cfg = SAEConfig(k=a.k, d_sae=D_SAE, target_hook="target", skip=a.skip, decoder_init="zeros", optimizer=a.optimizer,
                    lr=a.lr)
    ours = SparseAutoencoder(cfg, x.shape[1], d_out=y.shape[1])
    mean = x[:BATCH].mean(0)
    shift = mean if a.centred else torch.zeros_like(mean)
    with torch.no_grad():  # its Trainer's first-step init, copied into ours
        theirs.encoder.bias.data = -mean @ theirs.encoder.weight.data.T
        theirs.b_dec.data = y[:BATCH].mean(0).clone()
        ours.W_enc[0].copy_(theirs.encoder.weight.T)
        ours.initialize_tied_parameters(mean - shift, theirs.b_dec)
    their_step = ScheduleFreeWrapper(SignSGD([{"params": theirs.parameters(), "lr": SPARSIFY_LR}]), momentum=0.95)
    their_step.train()
    our_step = make_optimizer(a.optimizer, ours.parameters(), a.lr)
    for step in range(a.steps):
        lo = step * BATCH % (x.shape[0] - BATCH + 1)
        xb, yb = x[lo : lo + BATCH], y[lo : lo + BATCH]
        out = theirs(xb, yb)
        out.fvu.backward()
        their_step.step()
        their_step.zero_grad()
        mine = sae_loss(ours, xb - shift, 0.0, None, yb)
        mine.loss.backward()
        our_step.step()
        our_step.zero_grad()
        if step % 10 == 0 or step == a.steps - 1:
            ours_fvu = float(mine.mse) * BATCH / float(((yb - yb.mean(0)) ** 2).sum())
            print(f"step {step:4d}  batch FVU: sparsify {float(out.fvu):.4f}  this project {ours_fvu:.4f}", flush=True)
    their_step.eval()
    at_average(our_step)
    with torch.no_grad():
        print(f"held-out FVU after {a.steps} steps: sparsify {fvu(theirs(ex, ey).sae_out, ey):.4f}  "
              f"this project ({a.optimizer}, lr {a.lr:g}{', centred' if a.centred else ''}) "
              f"{fvu(ours(ex - shift).decoded_activations, ey):.4f}")


if __name__ == "__main__":
    main()
