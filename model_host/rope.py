"""Rotary position embedding with DeepSeek's YaRN extension, on interleaved pairs.

DeepSeek's checkpoints rotate the 64 rope channels as interleaved pairs ``(x[2i], x[2i+1])``
(the reference ``view_as_complex`` formulation).  transformers' DeepseekV3 (``rope_interleave``
true) rotates the same pairs but writes the result de-interleaved ([evens | odds]) for both q
and k; the permutation is identical on both sides so q.k, and therefore every logit, agrees.
We keep the reference (interleaved) layout, which is also what the latent cache stores.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig, yarn_mscale


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """Rope dimension whose wavelength completes ``num_rotations`` turns over ``max_pos``."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_correction_range(cfg: ModelConfig) -> tuple[int, int]:
    """Integer (low, high) ramp bounds over the rope pair index; (10, 23) for DeepSeek-V3."""
    rs, dim = cfg.rope_scaling, cfg.qk_rope_head_dim
    assert rs is not None
    low = math.floor(_correction_dim(rs.beta_fast, dim, cfg.rope_theta, rs.original_max_position_embeddings))
    high = math.ceil(_correction_dim(rs.beta_slow, dim, cfg.rope_theta, rs.original_max_position_embeddings))
    return max(low, 0), min(high, dim - 1)


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair inverse frequencies [rope_dim // 2] in fp32, YaRN-corrected when active.

    Below the ramp (high-frequency pairs) frequencies are unchanged; above it they are divided
    by ``factor``; in between a linear blend.
    """
    dim = cfg.qk_rope_head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not cfg.yarn_active:
        return freqs
    low, high = yarn_correction_range(cfg)
    hi = high if high != low else high + 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (hi - low)).clamp(0, 1)
    smooth = 1 - ramp  # 1 => keep the original frequency (extrapolate), 0 => interpolate
    return freqs / cfg.rope_scaling.factor * (1 - smooth) + freqs * smooth


def rope_attention_factor(cfg: ModelConfig) -> float:
    """Magnitude applied to cos/sin: mscale(factor, mscale) / mscale(factor, mscale_all_dim).

    Exactly 1.0 for DeepSeek-V3 (mscale == mscale_all_dim); kept for V2-style configs.
    """
    if not cfg.yarn_active:
        return 1.0
    rs = cfg.rope_scaling
    return yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)


class RotaryEmbedding(torch.nn.Module):
    """Computes (cos, sin) [.., rope_dim // 2] in fp32 for arbitrary position tensors."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_frequencies(cfg).to(device), persistent=False)
        self.attention_factor = rope_attention_factor(cfg)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 angles, computed per call: positions may be ragged (batched decode, paged serving).
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim of ``x``.

    ``x``: [B, S, ..., D]; ``cos``/``sin``: [B, S, D/2], broadcast over any middle (head) dims.
    Computed in fp32 and cast back, as in the reference complex-multiply formulation.
    """
    shape = (*cos.shape[:2], *([1] * (x.dim() - 3)), cos.shape[-1])
    c, s = cos.view(shape), sin.view(shape)
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).to(x.dtype)
