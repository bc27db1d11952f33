"""Rebuild the shipped demo corpus (`crossmap/data/corpus.jsonl`) from its Debian source packages.

The corpus mixes two kinds of real English text that may be redistributed:

* WordNet 3.0 (Debian `wordnet-base`): one document per synset, "lemmas (part of speech): gloss."
  followed by the synset's example sentences.  Short, concept-dense texts from every domain.
* The Python 3.11 documentation (Debian `python3.11-doc`, pulled in by `python3-doc`): prose
  paragraphs from the HTML pages with the markup stripped and every code block dropped.
  Consecutive short paragraphs of one passage are joined so documents are paragraph-sized.

Both are sampled with a fixed seed, mixed and shuffled, so a rebuild from the same packages gives a
byte-identical file.  Get the packages with

    apt-get update && apt-get download wordnet-base python3.11-doc
    dpkg -x wordnet-base_*.deb pkgs && dpkg -x python3.11-doc_*.deb pkgs
    python -m crossmap.data.build_corpus pkgs

(each path may be an extracted package root, or the `wordnet` / `html` directory itself).
"""

from __future__ import annotations

import argparse
import html
import json
import random
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

WORDNET_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}

# Pages that are indexes, changelogs or legal text rather than prose.
PYDOC_SKIP = re.compile(r"^(genindex|py-modindex|search|license|copyright|contents|whatsnew/changelog|_)")

_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")
_QUOTED = re.compile(r'"([^"]+)"')
_SPACES = re.compile(r"\s+")


# ---------------------------------------------------------------------------------------------- WordNet


def _wordnet_dir(root: Path) -> Path | None:
    for candidate in (root, root / "usr/share/wordnet"):
        if (candidate / "data.noun").is_file():
            return candidate
    return None


def parse_wordnet_line(line: str) -> tuple[list[str], str, list[str]] | None:
    """(lemmas, definition, examples) of one `data.<pos>` line; None for licence header lines.

    Line format (wndb(5)): offset lex_filenum ss_type w_cnt(hex) [word lex_id]... p_cnt [ptr]... | gloss
    """
    if line.startswith(" ") or "|" not in line:
        return None
    fields, gloss = line.split("|", 1)
    parts = fields.split()
    n_words = int(parts[3], 16)
    lemmas = []
    for word in parts[4:4 + 2 * n_words:2]:
        word = _ADJ_MARKER.sub("", word).replace("_", " ")
        if word not in lemmas:
            lemmas.append(word)
    gloss = gloss.strip()
    examples = [e.strip() for e in _QUOTED.findall(gloss) if e.strip()]
    definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
    return lemmas, definition, examples


def wordnet_documents(wordnet_dir: Path) -> Iterator[tuple[str, str]]:
    """(text, source) for every WordNet synset with a definition of at least four words."""
    for pos_file, pos_name in WORDNET_POS.items():
        with open(wordnet_dir / f"data.{pos_file}", encoding="utf-8") as f:
            for line in f:
                parsed = parse_wordnet_line(line)
                if parsed is None:
                    continue
                lemmas, definition, examples = parsed
                if len(definition.split()) < 4:
                    continue
                text = f"{', '.join(lemmas)} ({pos_name}): {definition}."
                text += "".join(f' Example: "{e}".' for e in examples)
                yield text, f"wordnet:{pos_file}:{line[:8]}"


# ---------------------------------------------------------------------------------------- Python docs


def _pydoc_html_dir(root: Path) -> Path | None:
    for candidate in (root, root / "usr/share/doc/python3-doc/html", *sorted(root.glob("usr/share/doc/python3.*/html"))):
        if (candidate / "tutorial").is_dir():
            return candidate
    return None


class _ProseExtractor(HTMLParser):
    """Collects the text of <p> elements inside Sphinx's main body as runs of prose.

    A run is a list of consecutive paragraphs; a heading, code block, table or definition term ends
    the run, so paragraphs are only joined with the prose that directly follows them.  Text inside
    <pre>, <table>, <script>, <style> and the pilcrow header links is never collected.
    """

    _BREAKS = {"pre", "table", "h1", "h2", "h3", "h4", "h5", "h6", "dt"}
    _VOID = {"br", "img", "hr", "meta", "link", "input", "wbr", "col", "area", "base", "source"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.runs: list[list[str]] = [[]]
        # open elements as (tag, is_body_div, is_skipped); Sphinx HTML is well formed bar void tags
        self._stack: list[tuple[str, bool, bool]] = []
        self._in_body = 0
        self._skipped = 0
        self._in_p = 0
        self._buf: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self._VOID:
            return
        classes = (dict(attrs).get("class") or "").split()
        is_body = tag == "div" and "body" in classes
        is_skip = tag in ("pre", "script", "style", "table") or (tag == "a" and "headerlink" in classes)
        self._stack.append((tag, is_body, is_skip))
        self._in_body += is_body
        self._skipped += is_skip
        if not self._in_body:
            return
        if tag in self._BREAKS and self.runs[-1]:
            self.runs.append([])
        if tag == "p":
            self._in_p += 1
            self._buf = []

    def handle_endtag(self, tag):
        if tag in self._VOID or not any(t == tag for t, _, _ in self._stack):
            return
        while self._stack:
            open_tag, is_body, is_skip = self._stack.pop()
            self._in_body -= is_body
            self._skipped -= is_skip
            if open_tag == "p" and self._in_p:
                self._in_p -= 1
                text = _SPACES.sub(" ", "".join(self._buf)).strip()
                if text:
                    self.runs[-1].append(text)
            if open_tag == tag:
                break

    def handle_data(self, data):
        if self._in_body and self._in_p and not self._skipped:
            self._buf.append(data)


def _looks_like_prose(text: str) -> bool:
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters >= 0.85 * len(text) and text[-1] in ".:;!?)" and not text.startswith((">>>", "$"))


def pydoc_paragraphs(html_text: str, min_words: int = 40, max_words: int = 300) -> list[str]:
    """Paragraph-sized prose documents of one Sphinx HTML page.

    Consecutive paragraphs of a run are joined until a document has at least `min_words` words;
    documents longer than `max_words` words, or that look like code or tables, are dropped.
    """
    parser = _ProseExtractor()
    parser.feed(html_text)
    parser.close()
    documents = []
    for run in parser.runs:
        pending: list[str] = []
        for paragraph in run:
            pending.append(html.unescape(paragraph))
            joined = " ".join(pending)
            if len(joined.split()) >= min_words:
                if len(joined.split()) <= max_words and _looks_like_prose(joined):
                    documents.append(joined)
                pending = []
    return documents


def pydoc_documents(html_dir: Path) -> Iterator[tuple[str, str]]:
    """(text, source) for every prose document of the Python HTML documentation, pages in sorted order."""
    for page in sorted(html_dir.rglob("*.html")):
        rel = page.relative_to(html_dir).as_posix()
        if PYDOC_SKIP.match(rel):
            continue
        for i, text in enumerate(pydoc_paragraphs(page.read_text(encoding="utf-8"))):
            yield text, f"python-docs:{rel}#{i}"


# ------------------------------------------------------------------------------------------------ build


def build_corpus(paths: list[Path], n_wordnet: int, n_pydoc: int, seed: int) -> list[dict[str, str]]:
    """Sample `n_wordnet` synsets and `n_pydoc` prose documents, mix and shuffle them with `seed`."""
    wordnet_dir = next((d for d in map(_wordnet_dir, paths) if d), None)
    html_dir = next((d for d in map(_pydoc_html_dir, paths) if d), None)
    if wordnet_dir is None:
        raise FileNotFoundError(f"no WordNet data.noun found under any of {[str(p) for p in paths]} "
                                "(extract Debian wordnet-base with dpkg -x)")
    if html_dir is None:
        raise FileNotFoundError(f"no Python HTML docs (a tutorial/ directory) found under any of "
                                f"{[str(p) for p in paths]} (extract Debian python3.11-doc with dpkg -x)")
    rng = random.Random(seed)
    wordnet = list(wordnet_documents(wordnet_dir))
    pydoc = list(pydoc_documents(html_dir))
    for name, docs, n in (("WordNet", wordnet, n_wordnet), ("Python docs", pydoc, n_pydoc)):
        if len(docs) < n:
            raise ValueError(f"{name}: asked for {n} documents but only {len(docs)} are available")
    picked = rng.sample(wordnet, n_wordnet) + rng.sample(pydoc, n_pydoc)
    rng.shuffle(picked)
    return [{"text": text, "source": source} for text, source in picked]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m crossmap.data.build_corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path,
                        help="extracted package roots (dpkg -x) or the wordnet / html directories")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("corpus.jsonl"))
    parser.add_argument("--wordnet", type=int, default=4000, help="number of WordNet synsets")
    parser.add_argument("--pydoc", type=int, default=2000, help="number of Python documentation paragraphs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    records = build_corpus(args.paths, args.wordnet, args.pydoc, args.seed)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    size = args.out.stat().st_size
    print(f"wrote {len(records)} documents, {size / 1e6:.2f} MB, to {args.out}")


if __name__ == "__main__":
    main()
