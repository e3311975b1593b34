"""The collection schema rag-ingest writes, Milvus' limits on its rows, and how to tell (and
describe) a collection that someone else made."""

from __future__ import annotations

from typing import Any

from pymilvus import CollectionSchema, DataType, Function, FunctionType, MilvusClient

from rag.bm25 import ANALYZER_PARAMS, title_of
from rag.types import Chunk

# 2: BM25 reads its own field, `bm25_text` (title + heading path + text, see rag/bm25.py);
# schema 1 fed BM25 the chunk text alone.
SCHEMA_VERSION = "2"
TEXT_MAX_BYTES = 65535  # Milvus VARCHAR limits count UTF-8 bytes, not characters
SOURCE_MAX_BYTES = 1024
HEADER_MAX_BYTES = 2048
# The embedding of each chunk's own (last) heading: hybrid search's third route, in collections
# with BM25 whose embedder has a route (MilvusStore._create). Optional: collections made before
# it, or without it, have no such field and search as before.
HEADING_FIELD = "heading_vector"
# HNSW's search breadth for the vector fields (AUTOINDEX is HNSW on Milvus Lite and servers):
# Lite's default found 97-98% of the exact top 40 on the en dev questions, 256 finds 99.9%
# (docs/benchmarks.md, round 5).
HNSW_EF = 256
RAG_FIELDS = ["id", "vector", "text", "source", "header_path", "chunk_index", "chunk_count", "file_hash",
              "embedder", "metadata"]

def build_schema(dim: int, analyzer: str, with_bm25: bool, with_heading: bool = False) -> CollectionSchema:
    """The fields rag-ingest writes; `sparse` and its BM25 function, and the heading vector,
    only where Milvus has them."""
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("text", DataType.VARCHAR, max_length=TEXT_MAX_BYTES)
    schema.add_field("source", DataType.VARCHAR, max_length=SOURCE_MAX_BYTES)
    schema.add_field("header_path", DataType.VARCHAR, max_length=HEADER_MAX_BYTES)
    schema.add_field("chunk_index", DataType.INT64)
    schema.add_field("chunk_count", DataType.INT64)
    schema.add_field("file_hash", DataType.VARCHAR, max_length=64)
    schema.add_field("embedder", DataType.VARCHAR, max_length=256)
    schema.add_field("metadata", DataType.JSON)
    if with_heading:
        schema.add_field(HEADING_FIELD, DataType.FLOAT_VECTOR, dim=dim)
    if with_bm25:
        # BM25 reads its own text (title + heading path + chunk, stemmed for `english`), so the
        # stored `text` stays what the prompt quotes.
        schema.add_field("bm25_text", DataType.VARCHAR, max_length=TEXT_MAX_BYTES, enable_analyzer=True,
                         analyzer_params=ANALYZER_PARAMS[analyzer])
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_function(Function(
            name="text_bm25", function_type=FunctionType.BM25,
            input_field_names=["bm25_text"], output_field_names=["sparse"],
        ))
    return schema


def ip_params(limit: int) -> dict[str, Any]:
    """Search params of an inner-product search of `limit` hits (Milvus refuses ef under the limit)."""
    return {"metric_type": "IP", "params": {"ef": max(HNSW_EF, limit)}}


def heading_text(chunk: Chunk) -> str:
    """What the heading vector embeds: the chunk's own (last) heading; for a chunk with no
    heading, its document's title (front matter `title`, else the file name as words)."""
    heads = [h.strip() for h in chunk.header_path if h.strip()]
    return heads[-1] if heads else title_of(chunk)


def row_problem(chunk: Chunk, lexical: str = "") -> str | None:
    """Why Milvus would refuse this chunk's row (a VARCHAR over its byte limit), else None.
    `lexical`: the row's BM25 text, where the collection has one."""
    for field, value, limit in (
        ("text", chunk.text, TEXT_MAX_BYTES),
        ("text with its title and headings", lexical, TEXT_MAX_BYTES),
        ("source path", chunk.source, SOURCE_MAX_BYTES),
        ("header path", chunk.heading, HEADER_MAX_BYTES),
    ):
        if len(value.encode()) > limit:
            return f"chunk {chunk.chunk_index} {field} is {len(value.encode())} bytes, over Milvus' {limit}-byte VARCHAR limit"
    return None


def routes(desc: dict[str, Any]) -> tuple[bool, bool]:
    """(BM25, heading vector): the search routes a described collection has beyond dense."""
    return bool(desc.get("functions")), any(f["name"] == HEADING_FIELD for f in desc["fields"])


def foreign_shape(desc: dict[str, Any]) -> str | None:
    """None for a collection rag-ingest made (its fields and `rag.embedder` property), else its
    fields, types and vector dimensions, e.g. "pk INT64, embedding FLOAT_VECTOR(dim 128)"."""
    if "rag.embedder" in (desc.get("properties") or {}) and set(RAG_FIELDS) <= {f["name"] for f in desc["fields"]}:
        return None
    return ", ".join(
        f"{f['name']} {getattr(f['type'], 'name', f['type'])}"
        + (f"(dim {f['params']['dim']})" if "dim" in (f.get("params") or {}) else "")
        for f in desc["fields"]
    )
