"""Transcoders side by side: this project's against EleutherAI's sparsify on the same cached rows,
and a cross-layer transcoder against per-layer transcoders at the same total L0.

    .venv/bin/python bench/transcoders.py [--tokens 409600] [--sparsify-python /work/sparsify-venv/bin/python]

Data: shakespeare-gpt (the repo's causal LM, 4 layers, d 192), every MLP's input
(``blocks.L.mlp.hook_in``) and output (``blocks.L.hook_mlp_out``) harvested on the first 250k tokens
of the built-in corpus by a cache server started here (float32); 8 chunks held out. Part 1, layer 1:
a transcoder and a skip transcoder (TopK, k = 16 and 32, d_sae 1536) trained by this project's
trainer (its defaults, lr 1e-3) and by sparsify 1.3.3 with its own step (bench/sparsify_reference.py,
its own venv) on the same normalised training rows; both judged on the held-out rows (FVU against
the target; dead: never fires on any training or held-out row) and spliced into the model by the
server in place of the MLP on 16,384 held-out tokens (CE loss score, KL). Same k: the same L0.
Part 2, all 4 layers at k = 32 a layer: a CLT and a transcoder per layer (both this project's),
each spliced in place of every MLP at once (the per-layer transcoders as a CLT whose cross-layer
decoders are zero, so the server runs both as the same replacement model).
"""

import argparse
import json
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
from trainer.data.client import CacheClient  # noqa: E402
from trainer.data.local_server import LocalServer  # noqa: E402
from trainer.training.train import Trainer  # noqa: E402

LAYERS = 4
INPUTS = [f"blocks.{l}.mlp.hook_in" for l in range(LAYERS)]
OUTPUTS = [f"blocks.{l}.hook_mlp_out" for l in range(LAYERS)]
HARVEST = {"model": "shakespeare-gpt", "hooks": INPUTS + OUTPUTS, "corpus": "default", "n_tokens": 250_000,
           "context_size": 128, "dtype": "float32", "batch_size": 32}
D_SAE = 1536
PAIRS = [(skip, k) for skip in (False, True) for k in (16, 32)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/transcoders-bench"))
    parser.add_argument("--tokens", type=int, default=409_600, help="training tokens of each (both sides)")
    parser.add_argument("--downstream-tokens", type=int, default=16_384)
    parser.add_argument("--sparsify-python", default="/work/sparsify-venv/bin/python",
                        help="its venv's python; a path that does not exist skips the reference column")
    parser.add_argument("--optimizer", choices=("adam", "signsgd", "schedulefree_adam"), default=SAEConfig.optimizer,
                        help="this project's step (default: its default)")
    parser.add_argument("--lr", type=float, default=SAEConfig.lr, help="this project's lr (default: its default)")
    parser.add_argument("--part-one-only", action="store_true", help="layer 1's transcoders only (no CLT)")
    parser.add_argument("--save-rows", type=Path, metavar="DIR",
                        help="only write layer 1's normalised rows (train_x/y, eval_x/y .npy) to DIR, for bench/sparsify_lockstep.py")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another [[sae]] setting of this project's transcoders (a TOML value), e.g. resample_every=0")
    return parser.parse_args()


def settings(pairs: list[str]) -> dict:
    import tomllib

    return {key: value for pair in pairs for key, value in tomllib.loads(pair.replace("=", " = ", 1)).items()}


def run_config(tokens: int) -> RunConfig:
    return RunConfig(batch_size=4096, tokens=tokens, eval_chunks=8, shuffle_buffer_rows=65_536, log_every=10_000,
                     checkpoint_every=10_000)


def evaluation(client: CacheClient, manifest, body: bytes, hook: str, n_tokens: int):
    """The server's evaluation (``EvaluationResult``) of an SAE upload body registered at ``hook``,
    spliced into the model on ``n_tokens`` held-out tokens."""
    sae = client.request("POST", "/v1/saes", params={"dataset_id": manifest.dataset_id, "hook": hook}, content=body).json()
    return client.wait_evaluation(client.evaluate({"sae_id": sae["sae_id"], "n_tokens": n_tokens})).result


def downstream(client: CacheClient, manifest, body: bytes, hook: str, n_tokens: int) -> dict:
    return evaluation(client, manifest, body, hook, n_tokens).downstream.model_dump()


def folder_body(folder: Path) -> bytes:
    from trainer.data.client import sae_upload_body

    return sae_upload_body(folder)


def part_one(client, manifest, args, work: Path) -> list[dict]:
    """Layer 1's transcoders, ours and sparsify's."""
    layer = 1
    sweep = Sweep(run=run_config(args.tokens),
                  saes=tuple(SAEConfig(k=k, d_sae=D_SAE, target_hook=OUTPUTS[layer], skip=skip, optimizer=args.optimizer,
                                       lr=args.lr, **settings(args.set)) for skip, k in PAIRS))
    trainer = Trainer(client, manifest, [INPUTS[layer]], sweep, work / "ours", progress=False)
    trainer.prepare(resume=False)
    trainer.train()
    results = trainer.evaluate_and_export()
    tx, rows = save_rows(trainer, work)
    s_in, s_out = trainer.scales[0], trainer.out_scales(sweep.saes[0])[0]
    table = []
    for (skip, k), state, mine in zip(PAIRS, trainer.saes, results):
        dead = _dead(state, tx, rows)
        row = {"label": f"{'skip ' if skip else ''}transcoder k{k}", "ours": {
            "fvu": mine["fvu"], "l0": mine["l0"], "dead_pct": dead,
            **downstream(client, manifest, folder_body(work / "ours" / "saes" / state.name), INPUTS[layer],
                         args.downstream_tokens)}}
        reference = sparsify(args, work, k, skip, (s_in, s_out))
        if reference is not None:
            figures, body = reference
            row["sparsify"] = {**figures, "l0": float(k),
                               **downstream(client, manifest, body, INPUTS[layer], args.downstream_tokens)}
        table.append(row)
        print(json.dumps(row), file=sys.stderr)
    return table


def save_rows(trainer: Trainer, work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 1's normalised rows as .npy in ``work`` (the training rows in a seeded shuffle), the
    reference's input; returns the training and held-out inputs."""
    rows, ys = trainer.split(trainer.stream.evaluation_rows()[0])
    with ThreadPoolExecutor(4) as pool:
        train_rows, _ = trainer.stream.load_rows(trainer.stream.train_chunk_ids, pool)
    tx, tys = trainer.split(train_rows)
    order = torch.randperm(tx.shape[0], generator=torch.Generator().manual_seed(0))
    for name, t in (("train_x", tx[order]), ("train_y", tys[OUTPUTS[1]][order]), ("eval_x", rows),
                    ("eval_y", ys[OUTPUTS[1]])):
        np.save(work / f"{name}.npy", t.contiguous().numpy())
    return tx, rows


def _dead(state, train_x: torch.Tensor, eval_x: torch.Tensor) -> float:
    """% of latents that fire on no training or held-out row."""
    sae = state.sae.eval()
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    with torch.no_grad():
        for part in (train_x, eval_x):
            for lo in range(0, part.shape[0], 8192):
                fired |= (sae(part[lo : lo + 8192]).learned_activations > 0).reshape(-1, sae.d_sae).any(0)
    return 100 * float((~fired).float().mean())


def sparsify(args, work: Path, k: int, skip: bool, scales: tuple[float, float]) -> tuple[dict, bytes] | None:
    python = Path(args.sparsify_python)
    if not python.exists():
        print(f"(no sparsify venv at {python}: reference column skipped)", file=sys.stderr)
        return None
    out = work / f"sparsify-k{k}-{'skip' if skip else 'plain'}.safetensors"
    files = [a for n in ("train-x", "train-y", "eval-x", "eval-y") for a in (f"--{n}", str(work / f"{n.replace('-', '_')}.npy"))]
    done = subprocess.run([str(python), str(Path(__file__).with_name("sparsify_reference.py")), *files, "--k", str(k),
                           "--d-sae", str(D_SAE), "--tokens", str(args.tokens), "--out", str(out),
                           *(["--skip"] if skip else [])], capture_output=True, text=True)
    if done.returncode:
        print(f"sparsify k={k} skip={skip} failed: {done.stderr[-2000:]}", file=sys.stderr)
        return None
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    s_in, s_out = scales
    t = load_file(out)  # on the normalised rows: fold the scales in, as this project's exports do
    state = {"W_enc": t["W_enc"] * s_in, "b_enc": t["b_enc"], "W_dec": t["W_dec"] / s_out, "b_dec": t["b_dec"] / s_out}
    if skip:
        state["W_skip"] = t["W_skip"] * (s_in / s_out)
    # A transcoder cfg with a top-level k: the server runs the exact TopK, sparsify's own encoder.
    cfg = {"architecture": "skip_transcoder" if skip else "transcoder", "d_in": t["W_enc"].shape[0],
           "d_out": t["W_dec"].shape[1], "k": k, "apply_b_dec_to_input": False,
           "metadata": {"hook_name": INPUTS[1], "hook_name_out": OUTPUTS[1]}}
    return figures, save({n: v.contiguous() for n, v in state.items()}, metadata={"cfg": json.dumps(cfg)})


def part_two(client, manifest, args, work: Path) -> list[dict]:
    """A CLT against a transcoder per layer, k = 32 a layer, each in place of every MLP at once."""
    targets = tuple(OUTPUTS)
    common = dict(k=32, d_sae=D_SAE, target_hook=targets, optimizer=args.optimizer, lr=args.lr, **settings(args.set))
    sweep = Sweep(run=run_config(args.tokens), saes=(SAEConfig(**common), SAEConfig(**common, cross_layer=True)))
    trainer = Trainer(client, manifest, INPUTS, sweep, work / "layers", progress=False)
    trainer.prepare(resume=False)
    trainer.train()
    results = trainer.evaluate_and_export()
    per_layer, clt = (work / "layers" / "saes" / s.name for s in trainer.saes)
    table = []
    for label, body, r in (("transcoder per layer", _as_clt(per_layer, k=32), results[0]),
                           ("CLT", folder_body(clt), results[1])):
        row = {"label": label, "fvu": r["fvu"], "l0_per_layer": r["l0"],
               **downstream(client, manifest, body, INPUTS[0], args.downstream_tokens)}
        table.append(row)
        print(json.dumps(row), file=sys.stderr)
    return table


def _as_clt(folder: Path, k: int) -> bytes:
    """Per-layer transcoder exports as one CLT body whose cross-layer decoder blocks are zero."""
    tensors = {}
    for l, hook in enumerate(INPUTS):
        t = load_file(folder / hook / "sae_weights.safetensors")
        W_dec = torch.zeros(t["W_dec"].shape[0], LAYERS - l, t["W_dec"].shape[1])
        W_dec[:, 0] = t["W_dec"]
        tensors |= {f"W_enc_{l}": t["W_enc"].T.contiguous(), f"b_enc_{l}": t["b_enc"], f"b_dec_{l}": t["b_dec"],
                    f"W_dec_{l}": W_dec}
    cfg = {"architecture": "clt", "k": k, "feature_input_hooks": INPUTS, "feature_output_hooks": OUTPUTS, "metadata": {}}
    return save(tensors, metadata={"cfg": json.dumps(cfg)})


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp, LocalServer(args.out / "store", log=args.out / "server.log") as server, \
            CacheClient(server.url) as client:
        manifest = client.wait(client.harvest(HARVEST), progress=False)
        if args.save_rows:
            args.save_rows.mkdir(parents=True, exist_ok=True)
            sweep = Sweep(run=run_config(args.tokens), saes=(SAEConfig(d_sae=D_SAE, target_hook=OUTPUTS[1]),))
            trainer = Trainer(client, manifest, [INPUTS[1]], sweep, Path(tmp) / "rows", progress=False)
            trainer.prepare(resume=False)
            save_rows(trainer, args.save_rows)
            return
        one = part_one(client, manifest, args, Path(tmp))
        two = [] if args.part_one_only else part_two(client, manifest, args, Path(tmp))
    print(f"shakespeare-gpt layer 1 MLP, {args.tokens:,} training tokens, d_sae {D_SAE}, same rows, ours {args.optimizer} "
          f"lr {args.lr:g} {' '.join(args.set)}; "
          f"CE score / KL on {args.downstream_tokens:,} held-out tokens")
    print(f"{'':22} {'FVU':>6} {'dead%':>6} {'CE score':>8} {'KL':>6} | sparsify {'FVU':>6} {'dead%':>6} {'CE score':>8} {'KL':>6}")
    for row in one:
        cells = [f"{r['fvu']:6.3f} {r['dead_pct']:6.2f} {r['ce_loss_score']:8.3f} "
                 f"{r['kl_div_with_sae']:6.3f}" for r in (row["ours"], row.get("sparsify")) if r]
        print(f"{row['label']:22} " + " | sparsify ".join(cells))
    print(f"all {LAYERS} MLPs replaced at once, k = 32 a layer:")
    for row in two:
        print(f"{row['label']:22} FVU {row['fvu']:.3f}  CE score {row['ce_loss_score']:.3f}  KL {row['kl_div_with_sae']:.3f}")
    (args.out / "transcoders.json").write_text(json.dumps({"tokens": args.tokens, "layer_1": one, "all_layers": two},
                                                          indent=1))


if __name__ == "__main__":
    main()
