"""SAE quality, side by side: a fixed sweep trained by this project's trainer, by SAELens and (the
TopK rows) by sparsify on the same cached activations, the same budget and the same held-out rows.

    .venv/bin/python bench/quality.py [--case minilm|shakespeare] [--tokens 409600] [--lr 4e-4] [--saelens-lr LR]

The data (``--case``): all-MiniLM-L6-v2 ``blocks.3.hook_resid_post`` (the default; the whole
built-in corpus, 290,944 rows) or shakespeare-gpt ``blocks.1.hook_resid_post`` (250,000 rows),
harvested by a cache server started here (float32, context 128), normalised as
the trainer does (mean norm sqrt(d)). 16 chunks (20,480 rows) are held out; no SAE sees them. This
project trains through its real path (stream from the server, ``Trainer``, export); its figures are
computed from the exported safetensors on the held-out rows in the model's units. SAELens (its own
virtual environment, see bench/saelens_reference.py) trains on the same training rows, shuffled,
and is evaluated on the same held-out rows. Both use batch 4096 (``--batch-size``), d_sae 8 x d (3072 for MiniLM) and the given lr
(``--saelens-lr`` for SAELens' own) with no warmup or decay; every other setting is each library's default. sparsify (its venv, see
bench/sparsify_reference.py) trains its TopK SAEs with its own Trainer's step and lr (SignSGD
under schedule-free averaging, lr 5e-3 / sqrt(d_sae / 2^14), FVU loss, decoder renormalised every
step), not the given lr.

Dead latents are counted as the field does, over the data the SAE is for: a latent is dead when the
final weights never fire it on any of the corpus's rows (training and held-out, 290,944); "silent" is
the stricter share that never fires on the 20,480 held-out rows alone, which also counts latents
that are only rare (a latent firing once in 10^5 rows is silent there a fifth of the time).

Downstream (a causal LM's case): every SAE of every side is uploaded to the server in the model's
units (the references' weights with the normalising scale folded in) and spliced in place of the
hook on ``--downstream-tokens`` of the corpus after the harvested part, which no SAE saw: its CE
loss score and KL, as the server's evaluations compute them.

Prints one row per SAE (L0, FVU, dead %, silent %, CE loss score, training tokens/s, each side, and
its FVU over the best anchor's at its L0: sparsify's TopK at the same k for the TopK family, the
frontier of SAELens' ReLU and JumpReLU points for those two; see ``versus_anchor``) and writes
``frontier-<tag>.png`` (FVU against L0, log axes; marker = architecture, colour = library) and
``quality-<tag>.json`` into --out.
"""

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.config import RunConfig, SAEConfig, Sweep  # noqa: E402
from trainer.data.client import CacheClient, sae_upload_body  # noqa: E402
from trainer.data.local_server import LocalServer  # noqa: E402
from trainer.evaluation.metrics import evaluate  # noqa: E402
from trainer.outputs.export import load_saelens  # noqa: E402
from trainer.training.train import Trainer  # noqa: E402
from bench.transcoders import evaluation, settings  # noqa: E402

# (hook, harvest request) of each case; d_sae is 8 x the hook's width
CASES = {
    "minilm": ("blocks.3.hook_resid_post", {"model": "all-MiniLM-L6-v2", "corpus": "default", "n_tokens": 290_944,
                                            "context_size": 128, "dtype": "float32", "batch_size": 32}),
    "shakespeare": ("blocks.1.hook_resid_post", {"model": "shakespeare-gpt", "corpus": "default", "n_tokens": 250_000,
                                                 "context_size": 128, "dtype": "float32", "batch_size": 32}),
}
CAUSAL = {"shakespeare"}  # the cases with a CE loss to score (MiniLM is a masked LM)
# (label, this project's config, SAELens' arch and flags)
SWEEP = [
    ("topk k16", dict(activation="topk", k=16), ("topk", ["--k", "16"])),
    ("topk k32", dict(activation="topk", k=32), ("topk", ["--k", "32"])),
    ("batchtopk k32", dict(activation="batchtopk", k=32), ("batchtopk", ["--k", "32"])),
    ("matryoshka-batchtopk k32", dict(activation="batchtopk", objective="matryoshka", k=32),
     ("matryoshka_batchtopk", ["--k", "32"])),
    ("relu l1 3", dict(activation="relu", l1_coefficient=3.0), ("standard", ["--coefficient", "3"])),
    ("relu l1 5", dict(activation="relu", l1_coefficient=5.0), ("standard", ["--coefficient", "5"])),
    ("jumprelu 1", dict(activation="jumprelu", l1_coefficient=1.0), ("jumprelu", ["--coefficient", "1"])),
    ("jumprelu 3", dict(activation="jumprelu", l1_coefficient=3.0), ("jumprelu", ["--coefficient", "3"])),
]
MARKERS = {"topk": "o", "batchtopk": "s", "matryoshka": "D", "relu": "^", "jumprelu": "v"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--case", choices=sorted(CASES), default="minilm",
                        help="minilm: MiniLM blocks.3 (d 384); shakespeare: shakespeare-gpt blocks.1 (d 192)")
    parser.add_argument("--layer", type=int, help="the residual stream after this block (default: the case's: "
                        "3 for MiniLM, 1 for shakespeare-gpt)")
    parser.add_argument("--tokens", type=int, default=409_600, help="training tokens per SAE (both sides)")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows a step (every side)")
    parser.add_argument("--lr", type=float, default=4e-4, help="this project's lr (and SAELens' unless --saelens-lr)")
    parser.add_argument("--saelens-lr", type=float, help="SAELens' lr (default: --lr)")
    parser.add_argument("--downstream-tokens", type=int, default=65_536,
                        help="held-out tokens the server splices each SAE into the model on, for the CE loss "
                             "score and KL (a causal LM's case only; 0: none)")
    parser.add_argument("--saelens-python", default="/work/saelens-venv/bin/python",
                        help="python of a venv with sae-lens (skipped when missing)")
    parser.add_argument("--sparsify-python", default="/work/sparsify-venv/bin/python",
                        help="python of a venv with eai-sparsify, for the TopK rows (skipped when missing)")
    parser.add_argument("--only", help="comma-separated labels of the sweep to run")
    parser.add_argument("--optimizer", choices=("adam", "signsgd", "schedulefree_adam"), default="adam", help="this project's step")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another [[sae]] setting of this project's SAEs (a TOML value), e.g. aux_coefficient=0")
    return parser.parse_args()


def ours(client: CacheClient, manifest, args, picked, folder: Path) -> tuple[dict, torch.Tensor, torch.Tensor, float]:
    """Train each SAE through the real trainer (one run each, so each has its own tokens/s);
    figures from the exported files, on the model's own units. Returns the (normalised) held-out
    and training rows too, for the reference side, and the normalising scale."""
    train_rows = None
    common = dict(d_sae=args.d_sae, lr=args.lr, lr_warmup=0, lr_decay=0, sparsity_warmup=0, optimizer=args.optimizer)
    common |= settings(args.set)  # --set may override the schedule above (lr_decay also ends resampling)
    run = RunConfig(batch_size=args.batch_size, tokens=args.tokens, eval_chunks=16, log_every=10_000, checkpoint_every=10_000)
    results = {}
    for label, config, _ in picked:
        out = folder / label.replace(" ", "-")
        trainer = Trainer(client, manifest, [args.hook], Sweep(run=run, saes=(SAEConfig(**common, **config),)), out,
                          progress=False)
        trainer.prepare(resume=False)
        trainer.train()
        trainer.evaluate_and_export()
        rows, _ = trainer.stream.evaluation_rows()
        if train_rows is None:
            with ThreadPoolExecutor(trainer.stream.fetch_threads) as pool:
                train_rows, _ = trainer.stream.load_rows(trainer.stream.train_chunk_ids, pool)
        rate = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["tokens_per_second"]
        sae, _ = load_saelens(out / "saes" / trainer.saes[0].name)
        held_out = evaluate(sae, rows / trainer.scales[0])
        fired_in_training = evaluate(sae, train_rows / trainer.scales[0]).freqs > 0
        dead = int(((held_out.freqs == 0) & ~fired_in_training).sum())
        results[label] = {"l0": held_out.l0, "fvu": held_out.fvu, "dead_pct": 100 * dead / sae.d_sae,
                          "silent_pct": 100 * held_out.n_dead / sae.d_sae, "tokens_per_second": rate,
                          **spliced(client, manifest, args, sae_upload_body(out / "saes" / trainer.saes[0].name))}
        print(f"ours {label}: {results[label]}", file=sys.stderr)
    return results, rows, train_rows, trainer.scales[0]


def spliced(client: CacheClient, manifest, args, body: bytes) -> dict:
    """CE loss score and KL with the SAE (an upload body, on the model's units) in place of the
    hook's output, by the server on held-out text; none where the model is not a causal LM."""
    if not args.downstream_tokens or not args.causal:
        return {}
    result = evaluation(client, manifest, body, args.hook, args.downstream_tokens)
    # the server's FVU on that text, beside the held-out rows' (a check that the file computes what was trained)
    return {"ce_score": result.downstream.ce_loss_score, "kl": result.downstream.kl_div_with_sae,
            "spliced_fvu": 1 - result.explained_variance}


def reference_body(cfg: dict, t: dict[str, torch.Tensor], scale: float) -> bytes:
    """A reference SAE trained on the normalised rows (raw x scale), SAELens' layout, as an upload
    body on the model's units: the scale folded in, and the decoder norms where SAELens' TopK
    rescales its activations by them (the server runs the file as stored)."""
    if cfg.pop("rescale_acts_by_decoder_norm", False):
        norms = t["W_dec"].norm(dim=-1)
        t = {**t, "W_enc": t["W_enc"] * norms, "b_enc": t["b_enc"] * norms, "W_dec": t["W_dec"] / norms[:, None]}
    t = {**t, "W_enc": t["W_enc"] * scale, "W_dec": t["W_dec"] / scale, "b_dec": t["b_dec"] / scale}
    return save({n: v.contiguous() for n, v in t.items()}, metadata={"cfg": json.dumps(cfg)})


def saelens(args, picked, eval_rows: torch.Tensor, train_rows: torch.Tensor, splice) -> dict:
    python = Path(args.saelens_python)
    if not python.exists():
        print(f"(no SAELens venv at {python}: reference column skipped)", file=sys.stderr)
        return {}
    order = torch.randperm(train_rows.shape[0], generator=torch.Generator().manual_seed(0))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/train.npy", train_rows[order].numpy())
        np.save(f"{tmp}/eval.npy", eval_rows.numpy())
        for label, _, (arch, flags) in picked:
            command = [str(python), str(Path(__file__).with_name("saelens_reference.py")), "--train", f"{tmp}/train.npy",
                       "--eval", f"{tmp}/eval.npy", "--arch", arch, *flags, "--tokens", str(args.tokens),
                       "--batch-size", str(args.batch_size), "--lr", str(args.saelens_lr), "--d-sae", str(args.d_sae), "--seed", "0",
                       "--save", f"{tmp}/{arch}"]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                print(f"SAELens {label} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            cfg = json.loads(Path(f"{tmp}/{arch}/cfg.json").read_text())
            results[label] = {**json.loads(done.stdout.strip().splitlines()[-1]),
                              **splice(cfg, load_file(f"{tmp}/{arch}/sae_weights.safetensors"))}
            print(f"SAELens {label}: {results[label]}", file=sys.stderr)
    return results


def sparsify(args, picked, eval_rows: torch.Tensor, train_rows: torch.Tensor, splice) -> dict:
    """sparsify's TopK SAEs with its own step and lr (bench/sparsify_reference.py) on the same rows."""
    python = Path(args.sparsify_python)
    topk = [(label, config) for label, config, _ in picked if config["activation"] == "topk"]
    if not python.exists() or not topk:
        print(f"(no sparsify venv at {python} or no TopK row: its column skipped)", file=sys.stderr)
        return {}
    order = torch.randperm(train_rows.shape[0], generator=torch.Generator().manual_seed(0))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/train.npy", train_rows[order].numpy())
        np.save(f"{tmp}/eval.npy", eval_rows.numpy())
        for label, config in topk:
            command = [str(python), str(Path(__file__).with_name("sparsify_reference.py")), "--train-x",
                       f"{tmp}/train.npy", "--eval-x", f"{tmp}/eval.npy", "--out", f"{tmp}/sae.safetensors",
                       "--k", str(config["k"]), "--d-sae", str(args.d_sae), "--tokens", str(args.tokens),
                       "--batch-size", str(args.batch_size)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                print(f"sparsify {label} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            # its SparseCoder computes as SAELens' TopK does (b_dec off the input, top k of the ReLU'd
            # pre-activations, decoder rows as stored)
            cfg = {"architecture": "topk", "d_in": args.d_in, "d_sae": args.d_sae, "k": config["k"],
                   "apply_b_dec_to_input": True, "metadata": {"hook_name": args.hook}}
            results[label] = {**json.loads(done.stdout.strip().splitlines()[-1]),
                              **splice(cfg, load_file(f"{tmp}/sae.safetensors"))}
            print(f"sparsify {label}: {results[label]}", file=sys.stderr)
    return results


def versus_anchor(mine: dict, config: dict, reference: dict, strongest: dict) -> str | None:
    """This SAE's held-out FVU over the best anchor's at its L0: sparsify's TopK at the same k for
    the TopK family; for ReLU and JumpReLU, the frontier of SAELens' ReLU and JumpReLU points (those
    no sparser point beats), log-log interpolated at this L0. Past the frontier's sparse end, the
    ratio to its sparsest point is an upper bound ("<="), its FVU only rising as L0 falls; past its
    dense end, a lower bound (">=")."""
    if "k" in config:
        anchor = strongest.get(f"topk k{config['k']}")
        return anchor and f"{mine['fvu'] / anchor['fvu']:.2f}x"
    points = []
    for l0, fvu in sorted((r["l0"], r["fvu"]) for label, c, _ in SWEEP
                          if c["activation"] in ("relu", "jumprelu") and (r := reference.get(label))):
        if not points or fvu < points[-1][1]:
            points.append((l0, fvu))
    if not points:
        return None
    l0, fvu = mine["l0"], mine["fvu"]
    if l0 <= points[0][0]:
        return f"<={fvu / points[0][1]:.2f}x"
    if l0 >= points[-1][0]:
        return f">={fvu / points[-1][1]:.2f}x"
    (a, fa), (b, fb) = next((p, q) for p, q in zip(points, points[1:]) if p[0] <= l0 <= q[0])
    t = math.log(l0 / a) / math.log(b / a)
    return f"{fvu / math.exp((1 - t) * math.log(fa) + t * math.log(fb)):.2f}x"


def frontier(table: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for row in table:
        family = "matryoshka" if row["label"].startswith("matryoshka") else row["label"].split()[0]
        for side, colour in (("ours", "tab:blue"), ("saelens", "tab:orange"), ("sparsify", "tab:green")):
            if side in row:
                ax.scatter(row[side]["l0"], row[side]["fvu"], marker=MARKERS[family], color=colour, s=50)
    for family, marker in MARKERS.items():
        ax.scatter([], [], marker=marker, color="grey", label=family)
    ax.scatter([], [], marker="o", color="tab:blue", label="this project")
    ax.scatter([], [], marker="o", color="tab:orange", label="SAELens 6.54")
    ax.scatter([], [], marker="o", color="tab:green", label="sparsify 1.3.3")
    ax.set(xscale="log", yscale="log", xlabel="held-out L0", ylabel="held-out FVU",
           title=f"{title}, same rows and budget")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    picked = [s for s in SWEEP if not args.only or s[0] in args.only.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    args.hook, harvest = CASES[args.case]
    if args.layer is not None:
        args.hook = f"blocks.{args.layer}.hook_resid_post"
    tag = (("" if args.case == "minilm" else f"{args.case}-") + ("" if args.layer is None else f"layer{args.layer}-")
           + f"lr{args.lr:g}-{args.tokens}"
           + ("" if args.batch_size == 4096 else f"-batch{args.batch_size}")
           + (f"-saelens{args.saelens_lr:g}" if args.saelens_lr else ""))
    run_folder = args.out / f"train-{tag}"
    shutil.rmtree(run_folder, ignore_errors=True)  # a fresh run each time
    args.saelens_lr = args.saelens_lr or args.lr
    args.causal = args.case in CAUSAL
    with LocalServer(args.out / "store", log=args.out / "cache-server.log") as server, CacheClient(server.url) as client:
        manifest = client.wait(client.harvest({**harvest, "hooks": [args.hook]}), progress=False)
        args.d_in = manifest.hook(args.hook).d
        args.d_sae = 8 * args.d_in
        mine, scaled_eval, scaled_train, scale = ours(client, manifest, args, picked, run_folder)

        def splice(cfg: dict, weights: dict) -> dict:
            return spliced(client, manifest, args, reference_body(cfg, weights, scale))

        reference = saelens(args, picked, scaled_eval, scaled_train, splice)
        strongest = sparsify(args, picked, scaled_eval, scaled_train, splice)
    table = [{"label": label, "ours": mine[label], **({"saelens": reference[label]} if label in reference else {}),
              **({"sparsify": strongest[label]} if label in strongest else {}),
              "vs_anchor": versus_anchor(mine[label], config, reference, strongest)}
             for label, config, _ in picked]
    title = f"{manifest.model.name} {args.hook}"
    print(f"{title}: {manifest.n_items:,} rows, d_sae {args.d_sae}, {args.tokens:,} training tokens, lr {args.lr:g} "
          f"(SAELens {args.saelens_lr:g}), {scaled_eval.shape[0]:,} held-out rows")
    head = f"{'L0':>6} {'FVU':>6} {'dead%':>5} {'silent%':>7} {'CE':>5} {'tok/s':>6}"
    print(f"{'SAE':26} {head} | vs anchor | SAELens {head} | sparsify {head}")

    def cells(r: dict) -> str:
        return (f"{r['l0']:6.1f} {r['fvu']:6.3f} {r['dead_pct']:5.2f} {r['silent_pct']:7.2f} "
                f"{r.get('ce_score', math.nan):5.3f} {r['tokens_per_second']:6.0f}")

    for row in table:
        print(f"{row['label']:26} {cells(row['ours'])} | {row['vs_anchor'] or '-':>9} | " + " | ".join(
            cells(row[side]) if side in row else "-" for side in ("saelens", "sparsify")))
    (args.out / f"quality-{tag}.json").write_text(json.dumps({"lr": args.lr, "tokens": args.tokens, "table": table}, indent=1))
    frontier(table, args.out / f"frontier-{tag}.png", title)
    print(f"frontier plot: {args.out / f'frontier-{tag}.png'}")
    assert all(math.isfinite(row["ours"]["fvu"]) for row in table)


if __name__ == "__main__":
    main()
