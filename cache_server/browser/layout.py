"""What every browser page shares: one inline style sheet (``templates/base.html`` holds it), no
script, no CDN, so the pages render offline and in any browser; and how a vocabulary string is
shown. Every string from the vocabulary or a request is untrusted text: the templates escape it."""

from html import escape

from cache_server.saes.features import token_text

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
.figures span { margin-right: 1.5em; } .figures b { font-variant-numeric: tabular-nums; }
.example { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: .15em 0; }
.example .value { display: inline-block; width: 5.5em; color: #666; }
.tok { border-radius: 2px; } .tok.centre { outline: 1px solid #c33; }
.special { color: #888; font-style: italic; }
.hist { display: flex; align-items: flex-end; height: 80px; gap: 1px; }
.hist div { background: #4a7bd0; flex: 1; min-height: 1px; }
.axis { display: flex; justify-content: space-between; color: #666; font-size: .85em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; } td, th { padding: .15em .8em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.lens { display: flex; gap: 3em; } .note { color: #666; }
.ramp { display: inline-block; width: 8em; height: .8em; background: linear-gradient(to right, rgba(220, 80, 40, 0), rgba(220, 80, 40, 1)); }
.dead { color: #a33; font-size: .85em; } #saes td:first-child { white-space: nowrap; }
a.tok { color: inherit; text-decoration: none; } a.tok:hover { text-decoration: underline; }
.tok.target { outline: 1px dashed #36c; } .differs { background: #fde68a; } .prompt { color: #666; }
.cols { display: flex; gap: 2em; } .cols > div { flex: 1; } textarea { width: 100%; box-sizing: border-box; }
form { margin: .6em 0; }
"""
SPECIAL = ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]", "<|endoftext|>", "<s>", "</s>", "<pad>", "<unk>")


def shown(text: str, byte_level: bool = False) -> str:
    """A vocabulary string as the text it stands for, escaped. Byte-level BPE (GPT-2) marks a space
    with Ġ and continues a word otherwise; WordPiece (BERT) starts a word unless ``##`` continues
    it: so tokens join into whole words either way."""
    readable = token_text(text)
    if not (byte_level or text.startswith("##") or readable.startswith(" ") or text in SPECIAL):
        readable = " " + readable
    return escape(readable)
