"""Block allocation with prefix caching by hashed full blocks (vLLM / nano-vllm style).

A full block is identified by a hash chained over its tokens and its whole prefix, so two
sequences that share a system prompt plus retrieved context map their common full blocks to the
same physical blocks. Freed blocks keep their hash until reused, so a later request with the same
prefix still hits them (the RAG case: one system prompt, recurring context passages).

With MTP speculative decoding (``spec_tokens`` k > 0) two things change. A decoding sequence gets
slots for k more positions than its length (the verify forward writes its drafts there), and
:meth:`truncate` gives back the blocks that hold only rejected drafts. And the MTP layer's latent
at a position depends on the *next* token too, so a block's hash also covers the first token of
the block after it (``lookahead``): a shared block's MTP latents are then valid for every
sequence that matches it.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

from model_host.engine.sequence import Sequence


def block_hash(prev: bytes, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, spec_tokens: int = 0):
        if num_blocks < 2:
            raise ValueError(f"KV cache has {num_blocks} blocks; raise --kv-memory-gb")
        self.block_size = block_size
        self.spec_tokens = spec_tokens
        self.lookahead = 1 if spec_tokens else 0
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        # LRU of free blocks, least recently freed first. An OrderedDict, not a deque: a prefix hit
        # takes its cached blocks out of the middle, and deque.remove scanned a GPU cache's ~10^6
        # free blocks for each (about 100 ms of TTFT per RAG request on an H200).
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hits = 0  # prompt tokens served from the cache
        self.queries = 0  # prompt tokens looked up

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def _take(self, block: int) -> None:
        if self.ref[block] == 0:
            del self.free[block]  # a cached free block comes back to life
        self.ref[block] += 1

    def _fresh(self) -> int:
        block, _ = self.free.popitem(last=False)
        if self.hash_of[block] is not None:
            self.by_hash.pop(self.hash_of[block], None)
            self.hash_of[block] = None
        self.ref[block] = 1
        return block

    def can_allocate(self, seq: Sequence) -> bool:
        # Conservative: ignores cache hits, so admission never over-commits.
        return self.blocks_needed(len(seq) + 1) <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` blocks for its tokens, reusing cached full blocks of its prefix.

        The last token is always recomputed (its logits start decoding), so only full blocks that
        end before it are matched; the block it lands in is private to this sequence.
        """
        assert not seq.block_table
        bs, prev, cached, la = self.block_size, b"", 0, self.lookahead
        matching = True
        seq.block_hashes, seq.blocks_registered = [], 0
        for i in range(self.blocks_needed(len(seq))):
            tokens = seq.token_ids[i * bs : (i + 1) * bs + la]
            full_before_last = (i + 1) * bs + la <= len(seq) - 1
            h = block_hash(prev, tokens) if full_before_last else None
            block = self.by_hash.get(h) if (h is not None and matching) else None
            if block is not None:
                self._take(block)
                cached += bs
            else:
                matching = False
                block = self._fresh()
            seq.block_table.append(block)
            if h is not None:
                seq.block_hashes.append(h)
                prev = h
        seq.num_cached_tokens = seq.num_computed = cached
        seq.table_version += 1
        self.queries += len(seq) - 1
        self.hits += cached

    def register_full_blocks(self, seq: Sequence, computed: int | None = None) -> None:
        """After a forward, publish hashes of blocks that are now full and computed: in every
        cache layer up to ``computed`` positions (default ``seq.num_computed``). Each sequence
        keeps its hash chain, so a call hashes and publishes only the blocks filled since the
        last one (it is called after every prefill chunk and whenever a decode fills a block)."""
        bs, la, chain = self.block_size, self.lookahead, seq.block_hashes
        computed = seq.num_computed if computed is None else computed
        full = min(computed, len(seq) - la) // bs
        for i in range(len(chain), full):
            chain.append(block_hash(chain[-1] if chain else b"", seq.token_ids[i * bs : (i + 1) * bs + la]))
        for i in range(seq.blocks_registered, full):
            h, block = chain[i], seq.block_table[i]
            if self.hash_of[block] is None and h not in self.by_hash:
                self.hash_of[block] = h
                self.by_hash[h] = block
        seq.blocks_registered = max(seq.blocks_registered, full)

    def can_append(self, seq: Sequence) -> bool:
        return self.blocks_needed(len(seq) + self.spec_tokens) - len(seq.block_table) <= self.num_free

    def append_slot(self, seq: Sequence) -> None:
        """Make room for the token about to be written at position len(seq) - 1 (and for the
        ``spec_tokens`` drafts verified after it)."""
        while len(seq.block_table) * self.block_size < len(seq) + self.spec_tokens:
            seq.block_table.append(self._fresh())
            seq.table_version += 1

    def truncate(self, seq: Sequence) -> None:
        """Roll back rejected drafts: free the tail blocks that hold no computed position (their
        latents are past the sequence's length; nothing reads them)."""
        keep = self.blocks_needed(seq.num_computed)
        if keep < len(seq.block_table):
            seq.table_version += 1
        for block in reversed(seq.block_table[keep:]):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None
        del seq.block_table[keep:]

    def release(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):  # tail blocks first: prefixes stay cached longest
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.table_version += 1
        seq.num_computed = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
