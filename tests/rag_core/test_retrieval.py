"""Dense retrieval on the real Milvus FAQ pages: the right section ranks first, filters restrict."""

from __future__ import annotations

from rag.retriever import Retriever
from rag.store import MilvusStore


def test_storage_question_finds_the_storage_section(faq_store: MilvusStore, embedder):
    r = Retriever(faq_store, embedder).retrieve("How is data stored in milvus?", k=3)
    assert r.mode == "dense" and len(r.hits) == 3
    top = [(h.source.rsplit("/", 1)[-1], h.header_path) for h in r.hits]
    assert ("product_faq.md", "Product FAQ › Where does Milvus store data?") in top, top
    assert all(a.score >= b.score for a, b in zip(r.hits, r.hits[1:], strict=False))
    assert r.embed_ms > 0 and r.search_ms > 0


def test_filter_expression_restricts_the_source(faq_store: MilvusStore, embedder):
    retriever = Retriever(faq_store, embedder)
    question = "Why does my query performance degrade?"  # answered in performance_faq.md, not product_faq.md
    unfiltered = retriever.retrieve(question, k=10)
    assert any(not h.source.endswith("product_faq.md") for h in unfiltered.hits)
    filtered = retriever.retrieve(question, k=10, filter='source like "%product_faq%"')
    assert len(filtered.hits) == 10
    assert {h.source.rsplit("/", 1)[-1] for h in filtered.hits} == {"product_faq.md"}


def test_hits_carry_offsets_into_the_source(faq_store: MilvusStore, embedder):
    hit = Retriever(faq_store, embedder).retrieve("Where does Milvus store data?", k=1).hits[0]
    with open(hit.source, encoding="utf-8") as f:
        text = f.read()
    assert text[hit.metadata["start"] : hit.metadata["end"]] == hit.text
    assert hit.metadata["front_matter"]["title"] == "Product FAQ"


def test_collapse_gives_one_hit_per_section_in_rank_order(faq_store: MilvusStore, embedder):
    question = "How is data stored in milvus?"
    plain = Retriever(faq_store, embedder).retrieve(question, k=20).hits
    sections = [(h.source, h.header_path) for h in plain]
    assert len(set(sections)) < len(sections), "the FAQ pages should give some section two chunks in the top 20"
    collapsed = Retriever(faq_store, embedder, collapse=True).retrieve(question, k=5).hits
    keys = [(h.source, h.header_path) for h in collapsed]
    assert len(keys) == 5 and len(set(keys)) == 5
    first_seen = list(dict.fromkeys(sections))
    assert keys == first_seen[:5]  # each section's best chunk, in the plain ranking's order
    assert [h.rank for h in collapsed] == [1, 2, 3, 4, 5]
