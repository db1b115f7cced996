"""MkDocs hook: the sweep-file reference page is generated from the config classes' field
docstrings (``trainer.config_docs``), where each key is explained once."""

import re

BLOCK = re.compile(r"<!-- sweep-file-reference -->.*?<!-- /sweep-file-reference -->", re.S)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """The block between the marks (a note for readers of the raw file) becomes the tables."""
    if BLOCK.search(markdown):
        from trainer.config_docs import reference_markdown

        markdown = BLOCK.sub(lambda _: reference_markdown(), markdown)
    return markdown
