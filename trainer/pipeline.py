"""``sae-pipeline``: the main job on the built-in offline default, in one command.

Starts a cache server on 127.0.0.1, harvests shakespeare-gpt (the small causal LM that ships in
the repo; a residual stream and an MLP output) on the first part of the built-in corpus, trains a
small sweep on the residual stream from the cache URL (TopK at k = 16, 32, 64, 128 and ReLU + L1
at two coefficients: an L0 frontier), has the server splice each SAE into the model on the rest of
the corpus (CE loss score, KL) and compute each SAE's feature statistics over the held-out chunks
(the feature browser, /saes/<id>/), prints a results table and the browser's addresses, writes a
report, and stops the server (also on Ctrl-C; --serve keeps it up for the browser). A second run
is a cache hit for the harvest and resumes (or reuses) the training.

With --transcoders it does the same for dictionaries that replace computations: it harvests every
MLP's input and output and trains, side by side on the same batches, a transcoder per layer, a
skip transcoder per layer and a cross-layer transcoder (TopK, k = 32 a layer, x8), each spliced
into the model by the server in place of the MLPs (the CLT in place of all of them at once, and
of each alone) and browsable.
"""

import argparse
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from trainer.cli import PACKINGS, bearer_token, cache_url, closing_summary, corpus_ref, out_folder_problem, positive_int
from trainer.config import ConfigError, RunConfig, SAEConfig, Sweep
from trainer.data.client import CacheClient, CacheError
from trainer.data.local_server import LocalServer
from trainer.evaluation.downstream import evaluate_downstream
from trainer.evaluation.feature_browser import browse_features, page_lines, serve_pages
from trainer.report import training_rates, write_report
from trainer.training.interrupt import stop_on_ctrl_c
from trainer.training.train import RunError, Trainer

DEFAULT_MODEL = "shakespeare-gpt"
DEFAULT_HOOKS = ["blocks.2.hook_resid_post", "blocks.2.hook_mlp_out"]
DEFAULT_PORT = 8000  # python -m cache_server's


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sae-pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for the store and outputs (default: runs/MODEL, or "
                        "runs/MODEL-CORPUS for another corpus than the built-in: a second model never collides)")
    parser.add_argument("--cache-url", type=cache_url, help="use this cache server instead of starting one on 127.0.0.1")
    parser.add_argument("--token", type=bearer_token, default=os.environ.get("CACHE_SERVER_TOKEN") or None,
                        help="bearer token of --cache-url (default: $CACHE_SERVER_TOKEN)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="default: %(default)s (all-MiniLM-L6-v2 also ships)")
    parser.add_argument("--hook", action="append", dest="hooks", help="hook to harvest (repeatable)")
    parser.add_argument("--corpus", type=corpus_ref, default="default", help="corpus id or name (default: built-in), "
                        "or hf:PATH[:SPLIT[:COLUMN]] for a Hugging Face dataset")
    parser.add_argument("--corpora-dir", type=Path, help="the started server's folder of local Hugging Face datasets")
    parser.add_argument("--tokens", type=positive_int, default=250_000, help="rows to harvest (default: %(default)s)")
    parser.add_argument("--context-size", type=positive_int, default=128, help="default: %(default)s")
    parser.add_argument("--packing", choices=PACKINGS, default="concatenate",
                        help="documents back to back in windows, or one document per window (padding stores no "
                             "rows); default: %(default)s")
    parser.add_argument("--train-tokens", type=positive_int, default=200_000,
                        help="training tokens per SAE (default: %(default)s; at least one batch of 1024)")
    parser.add_argument("--downstream-tokens", type=positive_int, default=16_384,
                        help="held-out tokens for each SAE's CE loss score and KL (default: %(default)s)")
    parser.add_argument("--no-browser", action="store_true",
                        help="skip the feature browser (each SAE registered with the server and its feature "
                             "statistics computed over the held-out chunks)")
    parser.add_argument("--serve", action="store_true",
                        help="after the run, keep the cache server up for the feature browser until Ctrl-C")
    parser.add_argument("--transcoders", action="store_true", help="harvest every MLP's input and output and train "
                        "transcoders, skip transcoders (one per layer) and a cross-layer transcoder instead of SAEs")
    args = parser.parse_args(argv)
    if args.transcoders and args.hooks:
        parser.error("--transcoders harvests every MLP's input and output: drop --hook")
    if args.out is None:
        args.out = default_out(args.model, args.corpus, args.transcoders)
    return args


def default_out(model: str, corpus, transcoders: bool = False) -> Path:
    """runs/<model>[-<corpus>][-transcoders], each name reduced to letters, digits, '.', '_' and '-'.

    >>> default_out("shakespeare-gpt", "default"), default_out("org/model", {"hf": {"path": "a/b"}})
    (PosixPath('runs/shakespeare-gpt'), PosixPath('runs/org_model-a_b'))
    >>> default_out("shakespeare-gpt", "default", transcoders=True)
    PosixPath('runs/shakespeare-gpt-transcoders')
    """
    def slug(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"

    name = slug(model) if corpus == "default" else f"{slug(model)}-{slug(corpus['hf']['path'] if isinstance(corpus, dict) else corpus)}"
    return Path("runs") / (name + ("-transcoders" if transcoders else ""))


def _foreign(out: Path) -> str | None:
    """--out must be new, empty or a sae-pipeline folder: never another run's folder written into."""
    if not out.is_dir() or not any(out.iterdir()) or (out / "store").is_dir() or (out / "train").is_dir():
        return None
    return f"--out {out} holds something that is not a sae-pipeline folder; pick another folder"


def expected_seconds(tokens: int, train_tokens: int, transcoders: bool = False) -> float:
    """The main job's duration, scaled from one measured at the defaults with shakespeare-gpt on 2
    CPU cores (2026-12-07, bench machine: 2 min 33 s in all: harvest of 250k tokens 16 s, training
    6 SAEs on 200k 70 s, the rest (server start, evaluation, feature statistics, report) 67 s;
    TRANSCODER_SECONDS for --transcoders).

    >>> round(expected_seconds(250_000, 200_000))
    153
    """
    fixed, harvest, train = TRANSCODER_SECONDS if transcoders else (67, 16, 70)
    return fixed + harvest * tokens / 250_000 + train * train_tokens / 200_000


TRANSCODER_SECONDS = (133, 31, 93)
"""--transcoders at the defaults, measured on 2 CPU cores (2026-12-07: 4 min 17 s in all): the rest
(server start, 8 evaluations, the CLT's with each layer alone, feature statistics, report), the
harvest of 250k tokens at 8 hooks, training the three on 200k."""


def default_sweep(train_tokens: int) -> Sweep:
    """An L0 frontier from 16 to 128 active latents: TopK at four k, ReLU + L1 at two
    coefficients (SAELens' scale); every other setting the trainer's default recipe."""
    saes = [SAEConfig(activation="topk", k=k, expansion=8) for k in (16, 32, 64, 128)]
    saes += [SAEConfig(activation="relu", l1_coefficient=c, expansion=8) for c in (2.0, 5.0)]
    run = RunConfig(batch_size=1024, tokens=train_tokens, shuffle_buffer_rows=65_536, eval_chunks=4,  # held_out_chunks() sets it from the harvest
                    log_every=20, checkpoint_every=100)
    return Sweep(run=run, saes=tuple(saes))


def held_out_chunks(n_chunks: int) -> int:
    """Chunks the pipeline holds out for evaluation and the browser: a tenth of the harvest, 1 to 4
    (the default harvest's 47 chunks: 4, 21,504 rows; a small one keeps most of its rows to train on).

    >>> [held_out_chunks(n) for n in (2, 5, 19, 20, 47, 400)]
    [1, 1, 1, 2, 4, 4]
    """
    return min(4, max(1, n_chunks // 10))


def mlp_hooks(hook_names: list[str]) -> tuple[list[str], list[str]]:
    """Each MLP's input and output hook in layer order, as TransformerLens' bridge names them.

    >>> mlp_hooks(["blocks.1.mlp.hook_in", "blocks.0.mlp.hook_in", "blocks.0.hook_resid_post"])
    (['blocks.0.mlp.hook_in', 'blocks.1.mlp.hook_in'], ['blocks.0.hook_mlp_out', 'blocks.1.hook_mlp_out'])
    """
    layers = sorted(int(m.group(1)) for h in hook_names if (m := re.fullmatch(r"blocks\.(\d+)\.mlp\.hook_in", h)))
    return [f"blocks.{l}.mlp.hook_in" for l in layers], [f"blocks.{l}.hook_mlp_out" for l in layers]


def transcoder_sweep(train_tokens: int, targets: list[str]) -> Sweep:
    """A transcoder per layer, a skip transcoder per layer and a CLT, TopK at k = 32 a layer (the
    same total L0, so their downstream figures compare), the trainer's default recipe otherwise."""
    to = tuple(targets)
    saes = (SAEConfig(target_hook=to), SAEConfig(target_hook=to, skip=True), SAEConfig(target_hook=to, cross_layer=True))
    return Sweep(run=default_sweep(train_tokens).run, saes=saes)


@contextmanager
def cache_server(args: argparse.Namespace) -> Iterator[str]:
    """The URL of --cache-url, or of a server started here (and stopped on the way out)."""
    if args.cache_url:
        print(f"cache server at {args.cache_url}")
        yield args.cache_url
        return
    extra = ["--corpora-dir", str(args.corpora_dir)] if args.corpora_dir else []
    with LocalServer(args.out / "store", log=args.out / "cache-server.log", extra_args=extra) as server:
        print(f"cache server on {server.url} (store {args.out / 'store'})")
        yield server.url


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    request = {"model": args.model, "hooks": args.hooks or DEFAULT_HOOKS, "n_tokens": args.tokens, "corpus": args.corpus,
               "context_size": args.context_size, "packing": args.packing, "batch_size": 32}
    sweep = default_sweep(args.train_tokens)  # the transcoders' sweep has the same run settings
    train_dir = args.out / "train"
    problem = out_folder_problem(args.out) or _foreign(args.out) or (
        None if args.train_tokens >= sweep.run.batch_size else
        f"--train-tokens {args.train_tokens} is less than one batch of {sweep.run.batch_size}")
    if problem:
        print(f"sae-pipeline: error: {problem}", file=sys.stderr)
        return 2
    minutes = expected_seconds(args.tokens, args.train_tokens, args.transcoders) / 60
    what = "transcoders, skip transcoders and a CLT" if args.transcoders else f"{len(sweep.saes)} SAEs"
    print(f"sae-pipeline: harvest {args.tokens:,} tokens, train {what} on {args.train_tokens:,}, "
          f"evaluate and browse them; expect about {minutes:.1f} min on 2 CPU cores at shakespeare-gpt's speed "
          "(a cache hit skips the harvest); each stage's bar shows its ETA")
    try:
        with cache_server(args) as url, CacheClient(url, token=args.token) as client:
            inputs = [request["hooks"][0]]
            if args.transcoders:
                inputs, outputs = mlp_hooks(client.request("GET", f"/v1/models/{args.model}/hooks").json())
                if not inputs:
                    raise RunError(f"model '{args.model}' has no blocks.L.mlp.hook_in hooks to read MLP inputs at")
                request["hooks"], sweep = inputs + outputs, transcoder_sweep(args.train_tokens, outputs)
            accepted = client.harvest(request)
            if accepted.status == "completed":
                print(f"cache hit: dataset {accepted.dataset_id} is already harvested")
            manifest = client.wait(accepted)
            print(f"dataset {manifest.dataset_id}: {manifest.n_items:,} rows x {len(manifest.hooks)} hooks, "
                  f"{manifest.n_chunks} chunks of {manifest.chunk_rows} rows, {manifest.dtype}")
            sweep = replace(sweep, run=replace(sweep.run, eval_chunks=held_out_chunks(manifest.n_chunks_total)))
            trainer = Trainer(client, manifest, inputs, sweep, train_dir,
                              server_is_stable=bool(args.cache_url))
            trainer.prepare(resume=(train_dir / "run.json").exists())
            with stop_on_ctrl_c("sae-pipeline") as should_stop:
                trainer.train(should_stop=should_stop)
            if not trainer.finished:
                print(f"sae-pipeline: stopped at step {trainer.step} of {trainer.total_steps}, checkpoint saved; "
                      "run again to continue from it", file=sys.stderr)
                return 130
            results = trainer.evaluate_and_export()
            results = evaluate_downstream(client, manifest, trainer.hooks, train_dir, results, args.downstream_tokens)
            if not args.no_browser:
                results = browse_features(client, manifest, trainer.hooks, train_dir, results,
                                          trainer.stream.eval_chunk_ids)
            rates = training_rates(train_dir)
            live = bool(args.cache_url or args.serve)
            browser_url = url if live else f"http://127.0.0.1:{DEFAULT_PORT}"
            report = write_report(trainer, results, rates, args.out / "report", browser_url)
            _print_outcome(args, results, rates, train_dir, report, browser_url, live)
            if args.serve:
                return serve_pages(url, "sae-pipeline")
    except KeyboardInterrupt:
        print("sae-pipeline: interrupted; the server was stopped; run again to continue", file=sys.stderr)
        return 130
    except (CacheError, ConfigError, RunError, RuntimeError, OSError) as exc:
        print(f"sae-pipeline: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _print_outcome(args, results: list[dict], rates: dict[str, float], train_dir: Path, report: Path,
                   browser_url: str, live: bool) -> None:
    how = "" if live else f" (once `python -m cache_server --store {args.out / 'store'}` serves it; or run with --serve)"
    print(closing_summary(results, rates, train_dir, report, page_lines(results, browser_url), how))
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
