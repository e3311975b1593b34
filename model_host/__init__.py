"""model_host: a compact DeepSeek-V3 inference runtime.

Public API (what the serving engine builds on)::

    from model_host import load_model, Tokenizer, SamplingParams, Sampler, sample

    model = load_model(ckpt_dir, device="cuda", dtype=torch.bfloat16)   # DeepseekV3
    cache = model.new_cache(batch_size, max_seq_len)        # or any LatentCache (paged)
    out = model(input_ids, positions, cache, kv_len=..., last_only=True)   # ModelOutput
    next_ids = Sampler()(out.logits[:, -1], [params, ...], [generator, ...])

    model.ops = TritonOps()   # model_host.kernels.backend: the GPU kernels (default TorchOps)

Modules: config (ModelConfig), ops (the op interface + TorchOps), fp8 (Linear / StackedLinear),
rope, mla, moe, cache, model, spec + loader + checkpoint (on-disk format), tokenizer, sampler,
stop, generate, cli.
"""

from .cache import ContiguousLatentCache, LatentCache
from .config import ConfigError, ModelConfig
from .generate import GenerationResult, generate
from .loader import CheckpointError, load_model, validate_checkpoint
from .model import DeepseekV3, ModelOutput
from .sampler import Sampler, SamplingParams, sample
from .stop import StopMatcher
from .tokenizer import Tokenizer

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ContiguousLatentCache",
    "DeepseekV3",
    "GenerationResult",
    "LatentCache",
    "ModelConfig",
    "ModelOutput",
    "Sampler",
    "SamplingParams",
    "StopMatcher",
    "Tokenizer",
    "generate",
    "load_model",
    "sample",
    "validate_checkpoint",
]
