"""Incremental ingest: idempotent re-runs, edits touch only their file, deletions prune (or not)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.rag_core.conftest import do_ingest, run_cli, small_doc, snapshot


def ids_of(snap: dict[str, dict], name: str) -> set[str]:
    return {i for i, r in snap.items() if r["source"].endswith(name)}


def test_second_run_embeds_nothing_and_keeps_ids(small_corpus: Path, milvus_uri: str, embedder):
    first = do_ingest([small_corpus], milvus_uri, embedder)
    assert first.files_new == 4 and first.chunks_embedded == first.chunks_written > 0
    before = snapshot(milvus_uri, embedder)
    assert len(before) == first.chunks_written

    second = do_ingest([small_corpus], milvus_uri, embedder)
    assert second.chunks_embedded == 0 and second.chunks_written == 0 and second.chunks_deleted == 0
    assert second.files_unchanged == 4 and second.files_new == second.files_changed == 0
    after = snapshot(milvus_uri, embedder)
    assert after.keys() == before.keys()
    assert all(after[i]["text"] == before[i]["text"] for i in before)


def test_edit_changes_only_that_file_and_delete_prunes(small_corpus: Path, milvus_uri: str, embedder):
    do_ingest([small_corpus], milvus_uri, embedder)
    before = snapshot(milvus_uri, embedder)

    beta = small_corpus / "beta.md"
    beta.write_text(beta.read_text().replace("Part 2 of index building", "Part 2 of index building, rewritten"))
    rep = do_ingest([small_corpus], milvus_uri, embedder)
    assert (rep.files_changed, rep.files_unchanged, rep.files_new) == (1, 3, 0)
    after = snapshot(milvus_uri, embedder)
    for name in ("alpha.md", "gamma.md", "delta.md"):
        assert ids_of(after, name) == ids_of(before, name), name
    old, new = ids_of(before, "beta.md"), ids_of(after, "beta.md")
    assert old != new and rep.chunks_embedded == len(new)
    assert rep.chunks_deleted == len(old - new)
    assert all("rewritten" not in before[i]["text"] for i in old)
    assert any("rewritten" in after[i]["text"] for i in new)
    assert {after[i]["file_hash"] for i in new} == {after[next(iter(new))]["file_hash"]}  # one version only

    (small_corpus / "sub" / "gamma.md").unlink()
    rep = do_ingest([small_corpus], milvus_uri, embedder, prune=False)
    assert rep.files_removed == 0 and rep.chunks_embedded == 0
    assert snapshot(milvus_uri, embedder).keys() == after.keys()  # --no-prune keeps them

    rep = do_ingest([small_corpus], milvus_uri, embedder)
    assert rep.files_removed == 1 and rep.chunks_deleted == len(ids_of(after, "gamma.md"))
    pruned = snapshot(milvus_uri, embedder)
    assert not ids_of(pruned, "gamma.md")
    assert pruned.keys() == after.keys() - ids_of(after, "gamma.md")


def test_prune_only_inside_the_ingested_folder(tmp_path: Path, small_corpus: Path, milvus_uri: str, embedder):
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.md").write_text(small_doc("Keep", "replication", sections=1))
    do_ingest([small_corpus, other], milvus_uri, embedder)
    rep = do_ingest([small_corpus], milvus_uri, embedder)  # `other` not given: not a deletion
    assert rep.files_removed == 0
    assert ids_of(snapshot(milvus_uri, embedder), "keep.md")


@pytest.mark.slow  # two CLI runs, each loading the embedder
def test_dry_run_on_a_reopened_collection(small_corpus: Path):
    """A Milvus Lite collection reopened by a new process is 'released'; --dry-run read its state
    without loading it and died with a pymilvus traceback."""
    cwd = small_corpus.parent
    uri = str(cwd / "m.db")
    first = run_cli("ingest.cli", "docs", "--uri", uri, "--quiet", cwd=cwd)
    assert first.returncode == 0, first.stderr
    (small_corpus / "alpha.md").write_text(small_doc("Alpha", "data storage, edited"))
    dry = run_cli("ingest.cli", "docs", "--uri", uri, "--quiet", "--dry-run", cwd=cwd)
    assert dry.returncode == 0 and "Traceback" not in dry.stderr, dry.stderr
    assert "[dry run] docs: files 0 new, 1 changed, 3 unchanged" in dry.stdout, dry.stdout
