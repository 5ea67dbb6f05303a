"""Synthetic training data derived from batch metadata alone, so every rank builds the inputs it needs locally.

Each tensor comes from its own generator seeded by (data seed, iteration, dp replica, kind, microbatch, document,
media item): the rank that runs a pipeline's first chunk builds its inputs and the rank with the loss builds the
targets, without talking to each other, and the unpipelined reference builds the same tensors.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

LATENT_CHANNELS = 16
"""Channels of a video latent (MovieGen's VAE); a DiT token carries LATENT_CHANNELS * patch^2 values."""


def stable_seed(*key: object) -> int:
    """A 63-bit seed from `key` that is the same in every process (unlike `hash`)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True, slots=True)
class SyntheticData:
    """The tensors of one iteration's batch: `seed` is the job's data seed, the rest come from the batch."""

    seed: int
    iteration: int
    dp_replica: int = 0

    def generator(self, *key: object) -> torch.Generator:
        return torch.Generator().manual_seed(stable_seed(self.seed, self.iteration, self.dp_replica, *key))

    def text_ids(self, microbatch: int, document: int, tokens: int, vocab_size: int) -> torch.Tensor:
        """Token ids of one document's text (int64, shape (tokens,))."""
        g = self.generator("text", microbatch, document)
        return torch.randint(0, max(vocab_size, 1), (tokens,), generator=g)

    def image_patches(self, microbatch: int, document: int, item: int, patches: int, patch_dim: int) -> torch.Tensor:
        """Flattened pixel patches of one image, (patches, patch_dim), float32."""
        return torch.randn(patches, patch_dim, generator=self.generator("image", microbatch, document, item))

    def video_latents(self, microbatch: int, document: int, item: int, tokens: int, channels: int) -> torch.Tensor:
        """Clean latent tokens x0 of one clip, (tokens, channels), float32."""
        return torch.randn(tokens, channels, generator=self.generator("latent", microbatch, document, item))

    def diffusion_noise(self, microbatch: int, document: int, item: int, tokens: int, channels: int) -> torch.Tensor:
        """The noise added to one clip's latents (the DiT's regression target), (tokens, channels)."""
        return torch.randn(tokens, channels, generator=self.generator("noise", microbatch, document, item))

    def diffusion_timestep(self, microbatch: int, document: int, item: int) -> float:
        """Diffusion time of one clip in [0.02, 0.98] (cosine schedule)."""
        u = torch.rand(1, generator=self.generator("timestep", microbatch, document, item)).item()
        return 0.02 + 0.96 * float(u)


def cosine_alpha(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(signal, noise) scales of the cosine schedule at time t: x_t = a * x0 + s * noise."""
    angle = t * (math.pi / 2)
    return torch.cos(angle), torch.sin(angle)
