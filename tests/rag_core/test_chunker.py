"""Chunker properties on synthetic edge cases and on the real Milvus (English) and Chinese docs."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest

from ingest.chunker import Chunker, blobs
from ingest.loader import Document, discover, load
from rag.schema import HEADER_MAX_BYTES, TEXT_MAX_BYTES
from tests.conftest import shared_data
from tests.rag_core.conftest import run_cli, snapshot


def doc_of(text: str, source: str = "doc.md") -> Document:
    return Document(source=source, text=text, body_start=0, file_hash="h", metadata={})


def chunker_for(embedder, chunk_size: int = 256, overlap: int = 32) -> Chunker:
    return Chunker(embedder.count_tokens, embedder.max_tokens, chunk_size, overlap)


def containing(chunks, snippet: str):
    return [c for c in chunks if snippet in c.text]


def filler(n: int, word: str = "vector") -> str:
    """n sentences of prose: enough text to force several chunks around a block under test."""
    return " ".join(f"Sentence {i} explains how a {word} index answers a search quickly." for i in range(n))


def check_invariants(chunker: Chunker, doc: Document, chunks) -> None:
    """Offsets map back, indexes are contiguous, and no embed text exceeds the token limits."""
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert doc.text[c.start : c.end] == c.text, (doc.source, c.chunk_index)
        assert c.text.strip() == c.text and c.text
        assert c.chunk_count == len(chunks)
        n = chunker.count(chunker.embed_text(c))
        assert n <= chunker.max_tokens, (doc.source, c.chunk_index, n)
        assert n <= chunker.limit, (doc.source, c.chunk_index, n)


PY_FENCE = """```python
# Connect first: a '#' line inside a fence is code, not a heading
from pymilvus import MilvusClient

client = MilvusClient("milvus.db")
    # indented comment keeps its indentation
def search(q):
    if q:
        return client.search("docs", data=[q], limit=3)
    return []
```"""


def test_fence_with_hash_lines_stays_intact_and_is_not_a_heading(embedder):
    text = f"# Guide\n\n{filler(12)}\n\n## Search\n\n{filler(6)}\n\n{PY_FENCE}\n\n{filler(12)}\n"
    ch = chunker_for(embedder, chunk_size=128)
    chunks = ch.chunk(doc_of(text))
    check_invariants(ch, doc_of(text), chunks)
    assert len(chunks) > 3
    assert len(containing(chunks, PY_FENCE)) >= 1, "the fence fits in one chunk, so it must not be cut"
    # '# Connect first' inside the fence must not open a section
    assert {c.header_path for c in chunks} == {("Guide",), ("Guide", "Search")}


def test_fences_nested_in_lists_stay_intact(embedder):
    fence_a = "   ```bash\n   # install the client\n   pip install pymilvus\n   ```"
    fence_b = "   ```python\n   # run a query\n   def run():\n       return client.query('docs', filter='id > 0')\n   ```"
    text = (
        f"# Setup\n\n{filler(5)}\n\n1. Install it:\n\n{fence_a}\n\n   {filler(3, 'scalar')}\n\n"
        f"2. Query it:\n\n{fence_b}\n\n3. Done.\n\n{filler(8)}\n"
    )
    ch = chunker_for(embedder, chunk_size=64, overlap=8)
    chunks = ch.chunk(doc_of(text))
    check_invariants(ch, doc_of(text), chunks)
    for fence in (fence_a.strip(), fence_b.strip()):
        assert containing(chunks, fence), f"fence cut apart: {fence[:30]!r}"
    assert {c.header_path for c in chunks} == {("Setup",)}


def test_longer_fence_contains_a_shorter_one(embedder):
    inner = "````markdown\n# Not a heading\n```python\nprint('nested')\n```\n## Still not a heading\n````"
    text = f"# Doc\n\n{filler(10)}\n\n{inner}\n\n{filler(10)}\n\n~~~\n# tilde fence\n~~~\n"
    ch = chunker_for(embedder, chunk_size=96, overlap=8)
    chunks = ch.chunk(doc_of(text))
    check_invariants(ch, doc_of(text), chunks)
    assert containing(chunks, inner)
    assert containing(chunks, "~~~\n# tilde fence\n~~~")
    assert {c.header_path for c in chunks} == {("Doc",)}


def test_header_paths_and_heading_only_sections_merge_forward(embedder):
    text = (
        "# Install\n\nIntro to installing.\n\n"
        "## Linux\n\nLinux steps.\n\n"
        "### Docker\n\nDocker steps.\n\n"
        "## macOS\n\n"  # heading only: merges into the next section's chunk
        "### Homebrew\n\nbrew install milvus.\n\n"
        "# Upgrade\n\n"
        "#### Deep jump\n\nLevels may be skipped.\n"
    )
    ch = chunker_for(embedder)
    chunks = ch.chunk(doc_of(text))
    check_invariants(ch, doc_of(text), chunks)
    paths = [c.header_path for c in chunks]
    assert paths == [
        ("Install",), ("Install", "Linux"), ("Install", "Linux", "Docker"),
        ("Install", "macOS", "Homebrew"), ("Upgrade", "Deep jump"),
    ]
    brew = chunks[3]
    assert brew.text.startswith("## macOS") and "brew install milvus." in brew.text
    assert chunks[4].text.startswith("# Upgrade")
    assert ch.embed_text(chunks[2]).startswith("Install > Linux > Docker\n\n")
    assert chunks[2].heading == "Install › Linux › Docker"


def test_table_kept_whole_when_it_fits_and_split_by_rows_when_not(embedder):
    rows = "\n".join(f"| metric_{i} | {i * 3} | used by index type {i} |" for i in range(8))
    table = f"| name | value | note |\n|---|---|---|\n{rows}"
    text = f"# Metrics\n\n{filler(6)}\n\n{table}\n\n{filler(6)}\n"
    ch = chunker_for(embedder, chunk_size=160, overlap=16)
    chunks = ch.chunk(doc_of(text))
    check_invariants(ch, doc_of(text), chunks)
    assert ch.count(table) < 150 and containing(chunks, table)

    big_rows = "\n".join(f"| metric_{i} | {i * 3} | used by index type {i} |" for i in range(60))
    big = f"| name | value | note |\n|---|---|---|\n{big_rows}"
    text = f"# Metrics\n\n{big}\n"
    chunks = ch.chunk(doc_of(text))
    check_invariants(ch, doc_of(text), chunks)
    assert len(chunks) > 2
    for c in chunks[1:]:  # oversized: cut between rows, never inside one
        assert all(line.startswith("|") and line.endswith("|") for line in c.text.splitlines())


def test_front_matter_goes_to_metadata_not_chunks(embedder, tmp_path: Path):
    p = tmp_path / "page.md"
    p.write_text("---\ntitle: Product FAQ\nid: product_faq.md\ndate: 2024-07-09\n---\n\n# FAQ\n\nAnswer text.\n")
    doc = load(p, 10**6)
    assert isinstance(doc, Document)
    assert doc.metadata == {"title": "Product FAQ", "id": "product_faq.md", "date": "2024-07-09"}
    chunks = chunker_for(embedder).chunk(doc)
    assert [c.text for c in chunks] == ["# FAQ\n\nAnswer text."]
    assert all(c.start >= doc.body_start for c in chunks)
    assert chunks[0].metadata == {"front_matter": doc.metadata}
    assert "title:" not in chunker_for(embedder).embed_text(chunks[0])


def _uncovered(doc: Document, chunks) -> str:
    """Body text that lies in no chunk; only whitespace may be left out."""
    gaps, pos = [], doc.body_start
    for c in sorted(chunks, key=lambda c: c.start):
        gaps.append(doc.text[pos : c.start])
        pos = max(pos, c.end)
    gaps.append(doc.text[pos:])
    return "".join(gaps).strip()


def _load_tree(root: Path) -> list[Document]:
    docs = [load(f, 10**8) for f in discover([str(root)], ["**/*.md"]).files]
    docs = [d for d in docs if isinstance(d, Document)]
    assert len(docs) > 50
    return docs


@pytest.mark.slow
def test_real_english_docs_within_token_limit_and_offsets_exact(embedder):
    ch = chunker_for(embedder)
    total = 0
    for doc in _load_tree(shared_data("milvus_docs_en")):
        chunks = ch.chunk(doc)
        check_invariants(ch, doc, chunks)
        assert not _uncovered(doc, chunks), doc.source
        assert len({c.id for c in chunks}) == len(chunks)
        total += len(chunks)
    assert total > 3000


@pytest.mark.slow
@pytest.mark.parametrize("which", ["minilm", "e5"])
def test_real_chinese_docs_within_byte_and_token_limits(embedder, which):
    root = shared_data("zh_docs")
    if which == "e5":
        from rag.embedder import E5Embedder

        emb = E5Embedder(num_threads=1)  # only its tokenizer is used; it counts slowly, so one subtree
        root = root / "milvus_docs_v2.0.x_zh-CN"
    else:
        emb = embedder
    ch = chunker_for(emb)
    for doc in _load_tree(root):
        chunks = ch.chunk(doc)
        check_invariants(ch, doc, chunks)
        assert not _uncovered(doc, chunks), doc.source
        for c in chunks:
            assert len(c.text.encode()) <= TEXT_MAX_BYTES
            assert len(c.heading.encode()) <= HEADER_MAX_BYTES


def test_one_long_paragraph_splits_into_nearly_full_pieces(embedder):
    """An abstract with no line breaks is cut at word boundaries into pieces that use the budget
    (counting the special tokens once per word used to fill each piece to about a third)."""
    text = f"# Abstract\n\n{filler(60)}\n"
    ch = chunker_for(embedder, chunk_size=128, overlap=16)
    doc = doc_of(text)
    chunks = ch.chunk(doc)
    check_invariants(ch, doc, chunks)
    assert not _uncovered(doc, chunks)
    body = [c for c in chunks if c.text != "# Abstract"]
    sizes = [ch.count(ch.embed_text(c)) for c in body[:-1]]  # the last piece holds the remainder
    assert min(sizes) >= 0.75 * ch.limit, sizes
    total = ch.count(filler(60)) - ch.count("")
    assert len(body) <= total // int(0.75 * (ch.limit - 16)) + 2, (len(body), total)


def test_words_the_tokenizer_drops_do_not_repeat_or_lose_text(embedder):
    """Zero-width spaces tokenize to nothing; the splitter must still advance past them."""
    words = " ".join(f"claim{i} \u200b" for i in range(400))
    text = f"# Notes\n\n{words}\n"
    assert embedder.count_tokens("\u200b") == embedder.count_tokens("")
    ch = chunker_for(embedder, chunk_size=64, overlap=8)
    doc = doc_of(text)
    chunks = ch.chunk(doc)
    check_invariants(ch, doc, chunks)
    assert not _uncovered(doc, chunks)


def _letters(n: int, seed: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    rnd = random.Random(seed)
    return "".join(rnd.choice(alphabet) for _ in range(n))


def test_few_token_words_are_cut_to_the_byte_budget(embedder):
    """Words over WordPiece's 100 characters are one [UNK] each: 200 of them are few tokens but
    60 KB, which the token budget alone kept as one chunk with a meaningless vector."""
    words = " ".join(_letters(300, i, string.ascii_lowercase) for i in range(200))
    doc = doc_of(f"# Words\n\n{words}\n\nThe closing sentence is prose.\n")
    ch = chunker_for(embedder)
    chunks = ch.chunk(doc)
    check_invariants(ch, doc, chunks)
    assert not _uncovered(doc, chunks)
    budget = 32 * ch.limit  # bytes per token of the chunk size
    assert max(len(c.text.encode()) for c in chunks) <= budget
    assert len(chunks) >= len(words.encode()) // budget


def test_non_text_runs_are_left_out_and_prose_around_them_kept(embedder):
    image = f"![arch](data:image/png;base64,{_letters(20000, 1)})"
    rule = "|" + "-" * 1200 + "|"  # a very wide table's rule: punctuation, not data
    cjk = "向量数据库存储嵌入并支持相似性搜索。" * 80  # Chinese prose has no spaces either
    text = (f"# Diagram\n\nThe architecture is shown here {image} and explained below.\n\n"
            f"| a |\n{rule}\n| b |\n\n{cjk}\n\nAfter the image, the query node is explained.\n")
    doc = doc_of(text)
    ch = chunker_for(embedder)
    chunks = ch.chunk(doc)
    check_invariants(ch, doc, chunks)
    assert _uncovered(doc, chunks) == image  # the rule and the Chinese prose are all kept
    assert [(b.start, b.end) for b in blobs(text)] == [(text.index(image), text.index(image) + len(image))]
    joined = "\n".join(c.text for c in chunks)
    for kept in ("The architecture is shown here", "and explained below.", cjk[:40], "query node"):
        assert kept in joined


def test_inline_image_and_hex_line_never_abort_the_run(tmp_path: Path, embedder):
    """An 80 KB inline base64 image (letters and digits, as a flat image encodes) was one chunk
    over Milvus' VARCHAR limit and aborted the whole run with 0 rows; a 51 KB hex line was one
    51 KB chunk. Now both are left out with a warning and every file lands."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "image.md").write_text(
        f"# Diagram\n\nThe architecture is shown below.\n\n![arch](data:image/png;base64,{_letters(80_000, 2)})\n\n"
        "After the image, the text explains the query node.\n")
    (docs / "hexline.md").write_text(f"# Digests\n\nThe digest list follows.\n\n{_letters(51_000, 3, '0123456789abcdef')}\n")
    (docs / "normal.md").write_text("# Normal\n\nMilvus stores vectors in collections with a primary key.\n")
    uri = str(tmp_path / "m.db")
    res = run_cli("ingest.cli", "docs", "--uri", uri, "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "files 3 new" in res.stdout and "2 non-text runs left out" in res.stdout, res.stdout
    for name, size in (("image.md", "80,031"), ("hexline.md", "51,000")):
        warning = [ln for ln in res.stderr.splitlines() if ln.startswith(f"docs/{name}: left out 1 non-text run")]
        assert len(warning) == 1 and f"{size} characters" in warning[0] and "base64" in warning[0], res.stderr

    got = snapshot(uri, embedder)
    by_source: dict[str, list[str]] = {}
    for r in got.values():
        by_source.setdefault(r["source"], []).append(r["text"])
    assert set(by_source) == {"docs/image.md", "docs/hexline.md", "docs/normal.md"}
    assert any("query node" in t for t in by_source["docs/image.md"])
    assert all(len(r["text"].encode()) < 100 for r in got.values()), "only the prose around the runs lands"
