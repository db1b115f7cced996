"""The run report: a results table, the plots, and for a dozen live features their top-activating
contexts from held-out text (token ids stored beside the activations), as Markdown and HTML."""

import html
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer import plots
from trainer.downstream import downstream_columns
from trainer.train import Trainer

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


def top_contexts(trainer: Trainer, sae_index: int) -> list[tuple[int, float, list[Example]]]:
    """For live features of one SAE: (feature, frequency, top examples) on the held-out rows."""
    manifest, stream, client = trainer.manifest, trainer.stream, trainer.client
    rows, row_ids = stream.evaluation_rows()
    token_ids = {}
    for index in stream.eval_chunk_ids:
        tokens = client.chunk(manifest, "tokens", index)
        for token, seq, pos in tokens.tolist():
            token_ids[(seq, pos)] = token
    vocabulary = client.vocabulary(manifest.dataset_id)
    byte_level = is_byte_level(vocabulary)
    sae = trainer.saes[sae_index].sae.eval()
    with torch.no_grad():
        acts = torch.cat([sae(rows[i : i + 4096]).learned_activations for i in range(0, rows.shape[0], 4096)])
    acts = acts.reshape(acts.shape[0], -1)  # one component shown: the first
    acts = acts[:, : sae.d_sae]
    freqs = (acts > 0).float().mean(0)
    live = ((freqs > 0) & (freqs < 0.05)).nonzero().squeeze(1)
    chosen = live[acts[:, live].max(0).values.argsort(descending=True)[:N_FEATURES]]
    ctx = manifest.context_size
    out = []
    for feature in chosen.tolist():
        values, where = acts[:, feature].topk(N_EXAMPLES)
        examples = []
        for value, r in zip(values.tolist(), where.tolist()):
            if value <= 0:
                break
            row = int(row_ids[r])
            seq, pos = divmod(row, ctx)
            window = [token_ids.get((seq, p)) for p in range(max(0, pos - LEFT), pos + RIGHT + 1)]
            text = [vocabulary[t] if t is not None and t < len(vocabulary) else "" for t in window]
            centre = min(pos, LEFT)
            before, token, after = text[:centre], text[centre : centre + 1], text[centre + 1 :]
            examples.append(Example(value, *(_detokenize(t, byte_level) for t in (before, token, after))))
        out.append((feature, float(freqs[feature]), examples))
    return out


def write_report(trainer: Trainer, results: list[dict], rates: dict[str, float], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(trainer.out / "curves.png", folder / "curves.png")
    for r in results:
        shutil.copy(trainer.out / "saes" / r["sae"] / "histograms.png", folder / f"{r['sae']}-histograms.png")
    best = min(range(len(results)), key=lambda i: results[i]["fvu"] + (results[i]["l0"] > 64))
    features = top_contexts(trainer, best)
    name = results[best]["sae"]
    m = trainer.manifest
    md = ["# SAE run report", "",
          f"Dataset `{m.dataset_id}`: {m.model.name}, hook {', '.join(trainer.hooks)}, {m.n_items:,} rows; "
          f"metrics on {len(trainer.stream.eval_chunk_ids)} held-out chunks.", "",
          "| SAE | L0 | FVU | dead % | CE loss score | KL | tokens/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        score, kl = downstream_columns(r)
        md.append(f"| {r['sae']} | {r['l0']:.1f} | {r['fvu']:.3f} | {100 * r['n_dead'] / r['d_sae']:.1f} | "
                  f"{score} | {kl} | {rates.get(r['sae'], 0):,.0f} |")
    notes = sorted({f["unavailable"] for r in results for f in r.get("downstream", {}).values() if "unavailable" in f})
    md += ["", *(f"Downstream: {note}" for note in notes),
           "CE loss score: (CE zero-ablated - CE with the SAE) / (CE zero-ablated - CE clean), the SAE spliced "
           "into the model on held-out text; KL: of the spliced next-token distribution from the clean one.", ""]
    plots.frontier(results, folder / "frontier.png")
    md += ["![FVU and CE loss score against L0](frontier.png)", "", "![loss and L0](curves.png)", ""]
    md += [f"![{r['sae']}]({r['sae']}-histograms.png)" for r in results]
    md += ["", f"## Top-activating contexts: {name}", "",
           "The activating token is in «brackets»; contexts come from held-out text.", ""]
    for feature, freq, examples in features:
        md.append(f"### Feature {feature} (fires on {100 * freq:.2f}% of tokens)")
        md += [f"- {e.value:.2f}: …{e.before} «{e.token}» {e.after}…" for e in examples]
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
            body.append(f"<p>{html.escape(line).replace('`', '')}</p>")
    if table:
        body.append("<table>" + "".join(table) + "</table>")
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}"
             "p.ex{font-family:monospace;margin:2px 0}mark{background:#fd6}")
    return f"<!doctype html><meta charset=utf-8><title>SAE run report</title><style>{style}</style>\n" + "\n".join(body)
