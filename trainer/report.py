"""The run report: a results table, the plots, and for every SAE of the sweep its top-activating
live features with their contexts from held-out text (token ids stored beside the activations),
as Markdown and HTML."""

import html
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.evaluation.downstream import ce_loss_score, downstream_columns
from trainer.evaluation.frontier import GUIDANCE, marks
from trainer.training.train import Trainer

N_FEATURES, N_EXAMPLES, LEFT, RIGHT = 12, 5, 10, 3


@dataclass
class Example:
    value: float
    before: str
    token: str
    after: str


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable bytes stand for themselves, the others for the
    code points from 256 on, in byte order; this inverts it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


_BYTES = _byte_decoder()


def _detokenize(tokens: list[str], byte_level: bool = False) -> str:
    """Token strings as text. Byte-level BPE ('Ġ' is a space): the pieces' bytes, joined.
    WordPiece: '##' pieces join the previous token, the others are separated by a space."""
    if byte_level:
        raw = bytes(_BYTES[c] for t in tokens for c in t if c in _BYTES)
        return raw.decode("utf-8", errors="replace").replace("\n", "⏎")
    out = ""
    for t in tokens:
        if t.startswith("##"):
            out += t[2:]
        else:
            out += ("" if not out else " ") + t
    return out


def is_byte_level(vocabulary: list[str]) -> bool:
    return sum(t.startswith("Ġ") for t in vocabulary) > len(vocabulary) // 10


_SPECIAL = re.compile(r"\[[A-Z]+\]|<\|[^|]*\|>|</?s>|<pad>|<unk>")


@dataclass
class _Text:
    """What every SAE's contexts are read from: the held-out rows' token ids and the vocabulary."""

    token_ids: dict[tuple[int, int], int]
    where: dict[int, tuple[int, int]]
    """Each held-out row's (window, position): the tokens array says (a window may be short)."""
    vocabulary: list[str]
    byte_level: bool

    def piece(self, seq: int, pos: int) -> str | None:
        token = self.token_ids.get((seq, pos))
        return self.vocabulary[token] if token is not None and token < len(self.vocabulary) else None

    def starts_word(self, piece: str) -> bool:
        if self.byte_level:
            return piece[:1] in ("Ġ", "Ċ") or not piece[:1].isalnum()
        return not piece.startswith("##")


def _held_out_text(trainer: Trainer) -> _Text:
    manifest, client = trainer.manifest, trainer.client
    token_ids, where = {}, {}
    for index in trainer.stream.eval_chunk_ids:
        for row, (token, seq, pos) in enumerate(client.chunk(manifest, "tokens", index).tolist(),
                                                start=index * manifest.chunk_rows):
            token_ids[(seq, pos)] = token
            where[row] = (seq, pos)
    vocabulary = client.vocabulary(manifest.dataset_id)
    return _Text(token_ids, where, vocabulary, is_byte_level(vocabulary))


def _example(text: _Text, value: float, seq: int, pos: int) -> Example:
    """The context of (seq, pos): whole words on both sides, special tokens (BOS, [CLS]) left out."""
    left = [text.piece(seq, p) for p in range(max(0, pos - LEFT), pos)]
    right = [text.piece(seq, p) for p in range(pos + 1, pos + RIGHT + 4)]
    left = [p for p in left if p is not None and not _SPECIAL.fullmatch(p)]
    while left and not text.starts_word(left[0]):  # no half word at the start
        left.pop(0)
    right = [p for p in right if p is not None and not _SPECIAL.fullmatch(p)]
    cut = next((i for i, p in enumerate(right) if i >= RIGHT and text.starts_word(p)), len(right))
    token = text.piece(seq, pos) or ""
    before, centre, after = (_detokenize(pieces, text.byte_level) for pieces in (left, [token], right[:cut]))
    if not text.byte_level:  # WordPiece: words are spaced, '##' pieces are not
        before = before + " " if before and text.starts_word(token) else before
        after = (" " + after) if after and text.starts_word(right[0]) else after
    return Example(value, before, centre, after)


def top_contexts(trainer: Trainer, sae_index: int, text: _Text, n_features: int = N_FEATURES
                 ) -> list[tuple[int, float, list[Example]]]:
    """For live features of one SAE: (feature, frequency, top examples) on the held-out rows."""
    rows, row_ids = trainer.stream.evaluation_rows()
    rows = trainer.split(rows)[0]  # a transcoder's latents read its input too
    sae = trainer.saes[sae_index].sae.eval()
    with torch.no_grad():
        acts = torch.cat([sae(rows[i : i + 4096]).learned_activations for i in range(0, rows.shape[0], 4096)])
    acts = acts.reshape(acts.shape[0], -1)[:, : sae.d_sae]  # one component shown: the first
    freqs = (acts > 0).float().mean(0)
    live = ((freqs > 0) & (freqs < 0.05)).nonzero().squeeze(1)
    chosen = live[acts[:, live].max(0).values.argsort(descending=True)[:n_features]]
    out = []
    for feature in chosen.tolist():
        values, where = acts[:, feature].topk(N_EXAMPLES)
        examples = [_example(text, value, *text.where[int(row_ids[r])])
                    for value, r in zip(values.tolist(), where.tolist()) if value > 0]
        out.append((feature, float(freqs[feature]), examples))
    return out


def training_rates(run_dir: Path) -> dict[str, float]:
    """Each SAE's latest training tokens/s, from the run's metrics.jsonl."""
    rates = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rates[row["sae"]] = row["tokens_per_second"]
    return rates


def write_report(trainer: Trainer, results: list[dict], rates: dict[str, float], folder: Path,
                 browser_url: str | None = None) -> Path:
    """report.md and report.html; with ``browser_url`` (the cache server's address) each SAE links
    to its feature browser page there."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(trainer.out / "curves.png", folder / "curves.png")
    for r in results:
        shutil.copy(trainer.out / "saes" / r["sae"] / "histograms.png", folder / f"{r['sae']}-histograms.png")
    m = trainer.manifest
    md = ["# SAE run report", "",
          f"Dataset `{m.dataset_id}`: {m.model.name}, hook {', '.join(trainer.hooks)}, {m.n_items:,} rows; "
          f"metrics on {len(trainer.stream.eval_chunk_ids)} held-out chunks.", "",
          "| SAE | L0 | FVU | dead % | CE loss score | KL | frontier |", "|---|---:|---:|---:|---:|---:|---|"]
    for r, mark in zip(results, marks(results, ce_loss_score)):
        score, kl = downstream_columns(r)
        md.append(f"| {r['sae']} | {r['l0']:.1f} | {r['fvu']:.3f} | {100 * r['n_dead'] / r['d_sae']:.1f} | "
                  f"{score} | {kl} | {mark} |")
    if rates:
        md += ["", f"The {len(results)} SAEs trained together on every batch at {max(rates.values()):,.0f} tokens/s."]
    notes = sorted({f["unavailable"] for r in results for f in r.get("downstream", {}).values() if "unavailable" in f})
    md += ["", *(f"Downstream: {note}" for note in notes),
           "CE loss score: (CE zero-ablated - CE with the SAE) / (CE zero-ablated - CE clean), the SAE spliced "
           "into the model on held-out text; KL: of the spliced next-token distribution from the clean one. "
           "Frontier: no other SAE of the sweep is as sparse (L0) and better (FVU lower, CE loss score higher).",
           "", GUIDANCE.replace("guide: ", "Guide: "), ""]
    from trainer.outputs import plots  # matplotlib: a second's import that only a report needs

    plots.frontier(results, folder / "frontier.png")
    md += ["![FVU and CE loss score against L0](frontier.png)", "", "![FVU, L0 and dead latents](curves.png)", ""]
    md += [f"![{r['sae']}]({r['sae']}-histograms.png)" for r in results]
    text = _held_out_text(trainer)
    per_sae = max(3, N_FEATURES // len(results))
    md += ["", "## Top-activating contexts", "",
           "For each SAE, its most strongly activating live features (firing on under 5% of tokens) on "
           "held-out text; the activating token is marked «like this».", ""]
    for index, r in enumerate(results):
        md += [f"## {r['sae']}", ""]
        pages = [f"{browser_url}{entry['path']}" for entry in r.get("browser", {}).values() if "path" in entry]
        md += [f"Every feature of it in the feature browser: {page}" for page in pages if browser_url] + [""] * bool(pages)
        for feature, freq, examples in top_contexts(trainer, index, text, per_sae):
            md.append(f"### Feature {feature} (fires on {100 * freq:.2f}% of tokens)")
            md += [f"- {e.value:.2f}: …{e.before}«{e.token}»{e.after}…" for e in examples]
            md.append("")
    (folder / "report.md").write_text("\n".join(md))
    (folder / "report.html").write_text(_html(md))
    return folder


def _html(markdown: list[str]) -> str:
    """The same content as HTML (a small renderer for exactly what report.md holds)."""
    body, table = [], []
    for line in markdown:
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-:"):
                continue
            tag = "th" if not table else "td"
            table.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            continue
        if table:
            body.append("<table>" + "".join(table) + "</table>")
            table = []
        if line.startswith("![") and "](" in line:
            alt, src = line[2:-1].split("](")
            body.append(f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">')
        elif line.startswith("### "):
            body.append(f"<h3>{html.escape(line[4:])}</h3>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("- "):
            text = html.escape(line[2:]).replace("«", "<mark>").replace("»", "</mark>")
            body.append(f"<p class=ex>{text}</p>")
        elif line:
            text = html.escape(line).replace("`", "").replace("«", "<mark>").replace("»", "</mark>")
            body.append("<p>" + re.sub(r"(https?://[^\s<]+)", r'<a href="\1">\1</a>', text) + "</p>")
    if table:
        body.append("<table>" + "".join(table) + "</table>")
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}"
             "p.ex{font-family:monospace;margin:2px 0}mark{background:#fd6}")
    return f"<!doctype html><meta charset=utf-8><title>SAE run report</title><style>{style}</style>\n" + "\n".join(body)
