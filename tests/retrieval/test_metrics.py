"""The metric code against numbers worked out by hand, and the QA-file gold matching."""

from __future__ import annotations

import json
import math

import pytest

from evals.datasets import BeirData, Gold, QAItem, is_gold, load_qa, qa_ranking, subset
from evals.metrics import evaluate, max_per_key, mrr_at_k, ndcg_at_k, recall_at_k
from rag.types import Hit

QRELS = {
    "q1": {"d1": 1, "d3": 2},  # graded: d3 matters more
    "q2": {"d2": 1},
    "q3": {"d9": 0},  # judged but nothing relevant: BEIR leaves it out of the mean
}
RUN = {"q1": ["d3", "d2", "d1"], "q2": ["d4", "d5", "d2"], "q3": ["d9"]}


def test_ndcg_by_hand():
    # q1: DCG = 2/log2(2) + 0/log2(3) + 1/log2(4) = 2.5; ideal = 2/1 + 1/log2(3) = 2.6309
    assert ndcg_at_k(RUN["q1"], QRELS["q1"], 3) == pytest.approx(2.5 / (2 + 1 / math.log2(3)))
    assert ndcg_at_k(RUN["q1"], QRELS["q1"], 3) == pytest.approx(0.95023, abs=1e-5)
    # q2: DCG = 1/log2(4) = 0.5; ideal = 1
    assert ndcg_at_k(RUN["q2"], QRELS["q2"], 3) == pytest.approx(0.5)
    # cut-off: at k=1 q1 has d3 (gain 2) against an ideal of 2
    assert ndcg_at_k(RUN["q1"], QRELS["q1"], 1) == pytest.approx(1.0)
    assert ndcg_at_k(RUN["q2"], QRELS["q2"], 2) == 0.0


def test_recall_and_mrr_by_hand():
    assert recall_at_k(RUN["q1"], QRELS["q1"], 1) == 0.5
    assert recall_at_k(RUN["q1"], QRELS["q1"], 3) == 1.0
    assert recall_at_k(RUN["q2"], QRELS["q2"], 2) == 0.0
    assert mrr_at_k(RUN["q1"], QRELS["q1"], 10) == 1.0
    assert mrr_at_k(RUN["q2"], QRELS["q2"], 10) == pytest.approx(1 / 3)
    assert mrr_at_k(RUN["q2"], QRELS["q2"], 2) == 0.0


def test_evaluate_means_over_judged_queries():
    m = evaluate(RUN, QRELS, ["ndcg@3", "recall@1", "recall@3", "mrr@10", "mrr@2", "hit@1"])
    assert m["ndcg@3"] == pytest.approx((0.95023 + 0.5) / 2, abs=1e-5)  # q3 is not counted
    assert m["recall@1"] == pytest.approx(0.25)
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["mrr@2"] == pytest.approx(0.5)
    assert m["hit@1"] == pytest.approx(0.5)
    # A judged query the run lacks scores 0 rather than vanishing from the mean.
    assert evaluate({"q1": RUN["q1"]}, QRELS, ["mrr@10"])["mrr@10"] == pytest.approx(0.5)


def _hit(source: str, score: float, start: int = 0, end: int = 10, heading: str = "") -> Hit:
    return Hit(id=f"{source}{start}", score=score, text="", source=source, header_path=heading,
               chunk_index=0, metadata={"start": start, "end": end, "doc_id": source})


def test_max_per_doc_keeps_best_chunk():
    hits = [_hit("a", 0.9), _hit("b", 0.8), _hit("a", 0.7, 20), _hit("c", 0.95)]
    assert max_per_key(hits, lambda h: h.source) == ["c", "a", "b"]


def test_qa_gold_matching(tmp_path):
    item = QAItem("q?", (Gold("faq/product.md", heading="Is it free?", span=(100, 200)),))
    assert is_gold(_hit("docs/faq/product.md", 1, 150, 260), item)  # suffix path, overlapping span
    assert not is_gold(_hit("docs/faq/product.md", 1, 200, 260), item)  # touches, no overlap
    assert not is_gold(_hit("docs/other/product.md", 1, 150, 260), item)
    by_heading = QAItem("q?", (Gold("faq/product.md", heading="Is it free?"),))
    assert is_gold(_hit("faq/product.md", 1, heading="FAQ › Is it free?"), by_heading)
    assert not is_gold(_hit("faq/product.md", 1, heading="FAQ › Other"), by_heading)
    ranked, rels = qa_ranking([_hit("x.md", 1), _hit("faq/product.md", 1, 120, 130)], item)
    assert mrr_at_k(ranked, rels, 10) == 0.5
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q?", "source": "a.md", "span": [1, 5]}) + "\n\n")
    assert load_qa(path) == [QAItem("q?", (Gold("a.md", None, (1, 5)),), "1")]


def test_exact_match_needs_the_chunk_inside_the_gold_section_or_holding_it():
    gold = QAItem("q?", (Gold("a.md", span=(100, 200)),))
    inside, holding, straddling = _hit("a.md", 1, 120, 180), _hit("a.md", 1, 50, 250), _hit("a.md", 1, 150, 260)
    assert all(is_gold(h, gold) for h in (inside, holding, straddling))  # any overlap
    assert is_gold(inside, gold, "exact") and is_gold(holding, gold, "exact")
    assert not is_gold(straddling, gold, "exact")  # half of it is the next section
    ranked, rels = qa_ranking([straddling, inside], gold, "exact")
    assert mrr_at_k(ranked, rels, 10) == 0.5


def test_several_gold_passages_and_json_list_files(tmp_path):
    records = [
        {"id": "q1", "question": "How is it priced?",
         "gold": [{"source": "faq.md", "heading": "Cost"}, {"source": "pricing.md", "span": [0, 40]}]},
        {"question": "Where are logs?", "source": "ops.md"},
    ]
    as_list, as_lines = tmp_path / "qa.json", tmp_path / "qa.jsonl"
    as_list.write_text(json.dumps(records, indent=2))
    as_lines.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    items = load_qa(as_list)
    assert items == load_qa(as_lines)
    assert [it.id for it in items] == ["q1", "2"] and len(items[0].gold) == 2
    # Either gold passage answers the question; the first one found sets the rank.
    ranked, rels = qa_ranking([_hit("x.md", 1), _hit("docs/pricing.md", 1, 10, 30), _hit("faq.md", 1, heading="Cost")],
                              items[0])
    assert mrr_at_k(ranked, rels, 10) == 0.5 and len(rels) == 2


@pytest.mark.parametrize("text, named", [
    ('[{"question": "q"}]', "needs 'question' and 'source'"),
    ('{"question": "q", "gold": []}', "non-empty list"),
    ('{"question": "q", "source": "a.md", "span": [5, 1]}', "start < end"),
    ('{"question": "q", "source": "a.md"\n', "not valid JSON"),
    ('[{"question": "q", "source": "a.md"},]', "not valid JSON"),
])
def test_bad_qa_files_get_one_line_naming_the_fix(tmp_path, text, named):
    path = tmp_path / "qa.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=named) as err:
        load_qa(path)
    assert "\n" not in str(err.value)


def test_subset_is_fixed_and_keeps_judged_docs():
    corpus = {f"d{i}": {"title": "", "text": str(i)} for i in range(10)}
    data = BeirData(corpus, {"q1": "a", "q2": "b", "q3": "c"},
                    {"q1": {"d7": 1}, "q2": {"d8": 1, "d9": 1}, "q3": {"d0": 1}})
    sub = subset(data, limit_queries=2, limit_docs=4)
    assert list(sub.queries) == ["q1", "q2"]
    assert list(sub.corpus) == ["d7", "d8", "d9", "d0"]  # judged first, then corpus order
    assert subset(data, limit_queries=2, limit_docs=4).corpus.keys() == sub.corpus.keys()
