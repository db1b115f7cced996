"""``sae-train``: train a sweep of SAEs on a dataset streamed from a cache server.

    sae-train --cache-url http://127.0.0.1:8000 --dataset ID --hook blocks.3.hook_resid_post --out runs/x \\
              [--config sweep.toml] [--tokens N] [--device cpu|cuda] [--resume]
    sae-train --cache-url URL --model all-MiniLM-L6-v2 --hook H [--corpus ID] --tokens N --out runs/y

Pass --hook several times to train on several hooks at once as components ([batch, component, d]).
Under ``torchrun --nproc-per-node N -m trainer ...`` the SAEs train data-parallel (DDP), each rank
streaming its own share of the chunks; rank 0 writes the run folder (see trainer.training.distributed).
Without --dataset, the harvest of --model/--hook/--corpus is requested over REST (a cache hit when
it exists) and followed to its end before training.
"""

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import get_args

from shared.schemas import Packing
from trainer.config import ConfigError, RunConfig, load_sweep
from trainer.config_docs import field_docs
from trainer.data.client import CacheClient, CacheError, StoreReader
from trainer.evaluation.downstream import ce_loss_score, downstream_columns, evaluate_downstream
from trainer.evaluation.frontier import GUIDANCE, marks
from trainer.evaluation.feature_browser import browse_features, page_lines
from trainer.outputs.sinks import SinkError, TensorboardSink, WandbSink, require
from trainer.report import training_rates, write_report
from trainer.training.distributed import World, exit_process
from trainer.training.interrupt import stop_on_ctrl_c
from trainer.training.train import RunError, Trainer

PACKINGS = get_args(Packing)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sae-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-url", required=True, type=cache_url, help="cache server URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--token", type=bearer_token, help="bearer token of the cache server (for harvest requests)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="dataset id (GET /v1/datasets)")
    source.add_argument("--model", help="harvest this model's activations first (when not cached)")
    parser.add_argument("--corpus", type=corpus_ref, default="default", help="corpus id or name for --model "
                        "(default: built-in), or hf:PATH[:SPLIT[:COLUMN]] for a Hugging Face dataset")
    parser.add_argument("--harvest-tokens", type=positive_int, help="rows to harvest for --model (default: --tokens)")
    parser.add_argument("--context-size", type=positive_int, default=128, help="context size for --model")
    parser.add_argument("--packing", choices=PACKINGS, default="concatenate",
                        help="how --model's harvest packs documents into windows: back to back, or one document "
                             "per window (padding stores no rows); default: %(default)s")
    parser.add_argument("--hook", action="append", dest="hooks", required=True, help="hook to train on (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="run folder (created; never overwritten)")
    parser.add_argument("--config", type=Path, help="sweep file (TOML: [run] and [[sae]] tables)")
    run_docs = {k: v.replace('%', '%%') for k, v in field_docs(RunConfig).items()}  # the reference's text: said once
    parser.add_argument("--tokens", type=positive_int, help=f"overrides [run] tokens: {run_docs['tokens']}")
    parser.add_argument("--batch-size", type=positive_int, help=f"overrides [run] batch_size: {run_docs['batch_size']}")
    parser.add_argument("--device", help=f"overrides [run] device: {run_docs['device']}")
    parser.add_argument("--split", choices=["data", "saes"], help=f"overrides [run] split: {run_docs['split']}")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--follow", action="store_true", help="wait for an incomplete dataset's harvest to finish")
    parser.add_argument("--from-bucket", action="store_true", help="read chunks straight from the dataset's S3 "
                        "bucket (its manifest's store_url; credentials from AWS_* variables), not through the server")
    parser.add_argument("--outage-seconds", type=seconds, default=300.0, help="how long to retry a cache server that "
                        "answered before and went away, before checkpointing and stopping (default: %(default)s)")
    parser.add_argument("--downstream-tokens", type=whole_number, default=16_384, help="held-out tokens on which the "
                        "server splices each SAE into the model for CE loss score and KL (0: skip; default: %(default)s)")
    parser.add_argument("--no-browser", action="store_true", help="skip the feature browser: registering each SAE "
                        "with the server and computing its feature statistics over the held-out chunks")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--wandb", metavar="PROJECT", help="also log to this Weights & Biases project")
    parser.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard under --out/tensorboard")
    return parser.parse_args(argv)


def cache_url(text: str) -> str:
    """--cache-url: an http(s) URL with a host."""
    import httpx

    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a URL ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise argparse.ArgumentTypeError(f"{text!r}: give an http(s) URL with a host, e.g. http://127.0.0.1:8000")
    return text


def bearer_token(text: str) -> str:
    """--token: what an HTTP header can carry (visible ASCII)."""
    if not text or not all(33 <= ord(c) <= 126 for c in text):
        raise argparse.ArgumentTypeError("a bearer token is visible ASCII characters (no spaces or accents)")
    return text


def seconds(text: str) -> float:
    """A duration: a finite number of seconds, not negative."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, not negative; got {text}")
    return value


def out_folder_problem(out: Path) -> str | None:
    """Why --out cannot be a run folder (a file, under a file, not writable), found before any work
    and without creating anything."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"--out {out} is a file, not a folder" if existing == out else f"--out {out} lies under a file ({existing})"
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as exc:
        return f"--out {out} cannot be written: {existing}: {exc.strerror or exc}"
    return None


def whole_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def corpus_ref(text: str) -> str | dict:
    """--corpus: a corpus id or name, 'default', or hf:PATH[:SPLIT[:COLUMN]], a Hugging Face dataset
    (a folder in the server's --corpora-dir, or on the hub)."""
    if not text.startswith("hf:"):
        return text
    path, *rest = text[3:].split(":")
    if not path or len(rest) > 2 or not all(rest):
        raise argparse.ArgumentTypeError(f"{text!r}: use hf:PATH, hf:PATH:SPLIT or hf:PATH:SPLIT:COLUMN")
    return {"hf": {"path": path, **dict(zip(("split", "column"), rest))}}


def positive_int(text: str) -> int:
    """A count that must be positive: 0 is an error, never "unset"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _overrides(args: argparse.Namespace) -> dict:
    values = {"tokens": args.tokens, "batch_size": args.batch_size, "device": args.device, "split": args.split}
    return {k: v for k, v in values.items() if v is not None}


def _dataset_id(client: CacheClient, args: argparse.Namespace, train_tokens: int) -> str:
    if args.dataset:
        return args.dataset
    request = {"model": args.model, "hooks": args.hooks, "corpus": args.corpus,
               "n_tokens": args.harvest_tokens or train_tokens, "context_size": args.context_size,
               "packing": args.packing}
    accepted = client.harvest(request)
    return client.wait(accepted, progress=not args.no_progress).dataset_id


def _sinks(args: argparse.Namespace, trainer: Trainer) -> list:
    sinks = []
    if args.tensorboard:
        sinks.append(TensorboardSink(args.out / "tensorboard"))
    if args.wandb:
        sinks.append(WandbSink(args.wandb, args.out, trainer.identity()))
    return sinks


def _wait_complete(client: CacheClient, dataset_id: str, follow: bool, progress: bool):
    manifest = client.manifest(dataset_id)
    while not manifest.complete:
        if not follow:
            raise RunError(f"dataset {dataset_id} is not complete ({manifest.n_items:,} of "
                           f"{manifest.n_items_total:,} rows); wait for its harvest or pass --follow")
        if progress:
            print(f"waiting for dataset {dataset_id}: {manifest.n_items:,}/{manifest.n_items_total:,} rows", file=sys.stderr)
        time.sleep(2)
        manifest = client.manifest(dataset_id)
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = World.from_env()
    try:
        sweep = load_sweep(args.config, _overrides(args))
        if world.main and (problem := out_folder_problem(args.out)):
            raise RunError(problem)
        with CacheClient(args.cache_url, token=args.token, outage_seconds=args.outage_seconds) as client:
            dataset_id = _dataset_id(client, args, sweep.run.tokens)
            manifest = _wait_complete(client, dataset_id, args.follow, not args.no_progress)
            chunks = StoreReader.for_manifest(manifest) if args.from_bucket else None
            trainer = Trainer(client, manifest, args.hooks, sweep, args.out, progress=not args.no_progress, world=world,
                              chunks=chunks)
            if args.tensorboard:
                require("tensorboard", "--tensorboard")
            if args.wandb:
                require("wandb", "--wandb")
            trainer.prepare(resume=args.resume)
            trainer.extra_sinks = _sinks(args, trainer) if world.main else []
            with stop_on_ctrl_c("sae-train") as should_stop:
                trainer.train(should_stop=should_stop)
            if not trainer.finished:
                print(f"sae-train: stopped at step {trainer.step}; run again with --resume to continue", file=sys.stderr)
                return 130
            if not world.main:
                return 0
            results = trainer.evaluate_and_export()
            if args.downstream_tokens > 0:
                results = evaluate_downstream(client, manifest, args.hooks, args.out, results, args.downstream_tokens)
            if not args.no_browser:
                results = browse_features(client, manifest, trainer.hooks, args.out, results,
                                          trainer.stream.eval_chunk_ids)
            rates = training_rates(args.out)
            report = write_report(trainer, results, rates, args.out / "report", args.cache_url.rstrip("/"))
    except (CacheError, ConfigError, RunError, SinkError) as exc:
        print(f"sae-train: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the machine's, not the program's: a full disk, a folder made read-only mid-run
        print(f"sae-train: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sae-train: aborted; the last checkpoint stands", file=sys.stderr)
        return 130
    finally:
        world.close()
    if args.no_progress:
        print(json.dumps(results, indent=1))
    else:
        print(closing_summary(results, rates, args.out, report, page_lines(results, args.cache_url.rstrip("/"))))
    return 0


def closing_summary(results: list[dict], rates: dict[str, float], run_dir: Path, report: Path, pages: list[str],
                    how: str = "") -> str:
    """What a finished run says last (sae-train and sae-pipeline): the table, where everything is,
    and each SAE's feature browser page."""
    lines = ["", _table(results, rates), "", f"run folder: {run_dir} (SAEs in SAELens layout, eval.json, "
             "metrics.jsonl, plots)", f"report: {report / 'report.html'} (and report.md)"]
    if pages:
        lines += [f"feature browser{how}:", *pages]
    return "\n".join(lines)


def _table(results: list[dict], rates: dict[str, float] | None = None) -> str:
    """Per SAE: L0, FVU, dead % (held-out rows), when known the downstream CE loss score and KL
    (the SAE spliced into the model, first hook); then the sweep's training tokens/s: its SAEs
    train together on every batch, so there is one rate, not one per SAE."""
    downstream = any("downstream" in r for r in results)
    extra = f" {'CE score':>8} {'KL':>7}" if downstream else ""
    lines = [f"{'sae':44} {'L0':>7} {'FVU':>7} {'dead %':>7}{extra}  frontier"]
    for r, mark in zip(results, marks(results, ce_loss_score)):
        cells = ""
        if downstream:
            score, kl = downstream_columns(r)
            cells = f" {score:>8} {kl:>7}"
        lines.append(f"{r['sae']:44} {r['l0']:7.1f} {r['fvu']:7.3f} {100 * r['n_dead'] / r['d_sae']:7.1f}{cells}  {mark}")
    if rates:
        lines.append(f"training: {len(results)} SAE(s) together at {max(rates.values()):,.0f} tokens/s "
                     "(every SAE sees every token)")
    notes = {f["unavailable"] for r in results for f in r.get("downstream", {}).values() if "unavailable" in f}
    lines += [f"downstream: {note}" for note in sorted(notes)]
    lines.append("frontier: no other SAE of the sweep is as sparse (L0) and better (FVU lower, CE score higher)")
    return "\n".join(lines + [GUIDANCE])


def run() -> None:
    """The ``sae-train`` command (and ``python -m trainer``). A crash (a bug, not bad input) prints
    its traceback and exits 1 through ``exit_process`` too, so a rank under torchrun cannot abort."""
    try:
        code = main()
    except Exception:
        traceback.print_exc()
        code = 1
    exit_process(code)


if __name__ == "__main__":
    run()
