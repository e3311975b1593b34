"""One request's state inside the engine."""

from __future__ import annotations

import enum
import itertools
import time

import torch

from model_host.sampler import SamplingParams
from model_host.stop import StopMatcher
from model_host.tokenizer import StreamDecoder

_ids = itertools.count()
# The slot in ``token_ids`` of a token sampled on the device and not yet read back: the engine's
# overlapped step schedules and launches step n+1 (which reads the token on the device) before it
# reads step n's tokens (engine/engine.py). Tokens are read in order, so if any is pending the
# last one is.
PENDING = -1


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Prompt and generated tokens, the block table, and the streaming/stop state of a request."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, decoder: StreamDecoder,
                 generator: torch.Generator | None):
        self.id = next(_ids)
        self.prompt_len = len(prompt_ids)
        self.token_ids = list(prompt_ids)
        self.params = params
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.table_version = 0  # bumped by BlockManager on every change of block_table (runner.BlockTables)
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache on the last admission
        self.num_computed = 0  # tokens whose latents are in the cache
        self.block_hashes: list[bytes] = []  # prefix-cache hash chain of full blocks (BlockManager)
        self.blocks_registered = 0  # leading blocks already offered to the prefix cache
        self.decoder = decoder
        self.matcher = StopMatcher(params.stop)
        self.generator = generator
        self.finish_reason: str | None = None
        self.arrival = time.perf_counter()
        self.admitted_at: float | None = None  # first admission by the scheduler (queue time)
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.prompt_cached_tokens = 0  # reported in usage: cached tokens of the first admission
        self.admitted = False
        # MTP speculative decoding (model_host.engine.speculative): the MTP inputs still owed to
        # its cache, and the prompt's last hidden state until the first token is sampled.
        self.draft_input = None
        self.draft_hidden: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def awaiting_token(self) -> bool:
        """A sampled token is still on the device: the host cannot feed this sequence yet."""
        return bool(self.token_ids) and self.token_ids[-1] == PENDING

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
