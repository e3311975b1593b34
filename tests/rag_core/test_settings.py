"""Settings: environment first, CLI flags over it, and one clear line for a bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.config import IngestConfig
from rag.config import RagConfig
from rag.embedder import make_embedder
from rag.settings import SettingsError
from tests.rag_core.conftest import cli_env, run_cli


def test_defaults_then_env_then_overrides():
    assert RagConfig.load(environ={}).top_k == 5
    env = {"RAG_TOP_K": "7", "MILVUS_URI": "/srv/m.db", "RAG_SCORE_FLOOR": "0.4", "RAG_PRUNE": "no"}
    cfg = RagConfig.load(environ=env)
    assert (cfg.top_k, cfg.milvus_uri, cfg.score_floor) == (7, "/srv/m.db", 0.4)
    cfg = RagConfig.load(environ=env, top_k=3, milvus_uri=None)  # None: the flag was not given
    assert (cfg.top_k, cfg.milvus_uri) == (3, "/srv/m.db")
    assert IngestConfig.load(environ=env).prune is False
    assert IngestConfig.load(environ=env, prune=True).prune is True
    assert RagConfig.load(environ={"RAG_EMBED_DIM": "768"}).embed_dim == 768  # optional numbers are numbers
    assert RagConfig.load(environ={"RAG_SCORE_FLOOR": ""}).score_floor is None  # empty unsets an optional


@pytest.mark.parametrize(
    ("cls", "env", "named"),
    [
        (RagConfig, {"RAG_TOP_K": "five"}, "RAG_TOP_K='five' is not a valid int"),
        (RagConfig, {"LLM_TEMPERATURE": "hot"}, "LLM_TEMPERATURE='hot' is not a valid float"),
        (RagConfig, {"RAG_SCORE_FLOOR": "high"}, "RAG_SCORE_FLOOR='high' is not a valid float"),
        (RagConfig, {"RAG_TOP_K": "0"}, "RAG_TOP_K"),
        (RagConfig, {"RAG_MODE": "sparse"}, "RAG_MODE='sparse'"),
        (IngestConfig, {"RAG_PRUNE": "maybe"}, "RAG_PRUNE='maybe' is not a valid bool"),
        (IngestConfig, {"RAG_CHUNK_SIZE": "10"}, "chunk size 10 is too small"),
        (IngestConfig, {"RAG_CHUNK_OVERLAP": "200"}, "chunk overlap 200"),
        (IngestConfig, {"RAG_ANALYZER": "icu"}, "analyzer 'icu'"),
    ],
)
def test_bad_values_are_one_line_settings_errors(cls, env, named):
    with pytest.raises(SettingsError) as err:
        cls.load(environ=env)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_unknown_embedder_is_a_settings_error():
    with pytest.raises(SettingsError, match="unknown embedder 'bert'"):
        make_embedder(RagConfig.load(environ={}), "bert")


def test_cli_reports_a_bad_env_value_in_one_line(tmp_path: Path):
    cases = (("rag.cli", "rag-ask", ["q"], "RAG_TOP_K"), ("ingest.cli", "rag-ingest", ["."], "RAG_CHUNK_SIZE"))
    for module, prog, args, var in cases:
        res = run_cli(module, *args, cwd=tmp_path, env=cli_env(**{var: "lots"}))
        assert res.returncode == 2
        assert res.stderr.strip().splitlines() == [f"{prog}: {var}='lots' is not a valid int; fix or unset it"]


def test_default_overlap_follows_the_chunk_size():
    """`--chunk-size 64` failed with the fixed default overlap of 32 (half of 64)."""
    assert IngestConfig.load(environ={}).chunk_overlap == 32  # 256-token chunks keep their overlap
    assert IngestConfig.load(environ={}, chunk_size=64).chunk_overlap == 8
    assert IngestConfig.load(environ={"RAG_CHUNK_SIZE": "32"}).chunk_overlap == 4
    assert IngestConfig.load(environ={}, chunk_size=1024).chunk_overlap == 32
    assert IngestConfig.load(environ={"RAG_CHUNK_OVERLAP": "0"}, chunk_size=64).chunk_overlap == 0  # explicit wins
    with pytest.raises(SettingsError) as err:
        IngestConfig.load(environ={}, chunk_size=64, chunk_overlap=32)
    assert "lower --chunk-overlap (RAG_CHUNK_OVERLAP)" in str(err.value)
    with pytest.raises(SettingsError, match=r"at least 32 tokens \(--chunk-size, RAG_CHUNK_SIZE\)"):
        IngestConfig.load(environ={}, chunk_size=16)


def test_cli_chunk_size_64_with_the_default_overlap(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n" + "Milvus keeps vectors in segments. " * 40)
    res = run_cli("ingest.cli", "docs", "--chunk-size", "64", "--uri", str(tmp_path / "m.db"), "--dry-run",
                  "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "files 1 new" in res.stdout
