"""Synthetic training data derived from batch metadata alone, so every rank builds the inputs it needs locally.

Each tensor comes from its own generator seeded by (data seed, iteration, dp replica, kind, microbatch, document,
media item): the rank that runs a pipeline's first chunk builds its inputs and the rank with the loss builds the
targets, without talking to each other, and the unpipelined reference builds the same tensors.

The large tensors (pixels, latents, noise) are drawn on `SyntheticData.device`. On a GPU that is where they belong:
drawn on the host they cost tens of milliseconds per microbatch of one CPU thread inside the iteration (19 images
of 576 x 588 values), which a real trainer's data loader would have prepared in the background, and a benchmark
would then measure the random number generator instead of the schedule. Values depend on the device kind (the CPU
and CUDA generators differ), so every rank of a run and its reference must use the same kind.
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
    device: str = "cpu"
    """Where the large tensors are drawn ("cpu", "cuda:0", ...); token ids and timesteps stay on the host."""

    def generator(self, *key: object, device: str = "cpu") -> torch.Generator:
        seed = stable_seed(self.seed, self.iteration, self.dp_replica, *key)
        return torch.Generator(device=device).manual_seed(seed)

    def _normal(self, shape: tuple[int, int], *key: object) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator(*key, device=self.device), device=self.device)

    def text_ids(self, microbatch: int, tokens: int, vocab_size: int) -> torch.Tensor:
        """Token ids of a microbatch's text, its documents one after another (int64, shape (tokens,)).

        One draw per microbatch: a draw per document cost ~60 us of host time each on the development machine (a
        generator and three small tensors; 60 ms for a microbatch of 1,024 documents, now 0.8 ms), inside the timed
        step of the first pipeline stage: one suspect for why text-heavy GPU iterations ran above SEMU's
        prediction (docs/gpu.md section 6; not yet re-measured on GPUs).
        The CPU generator fills the ids in order, so a longer draw extends a shorter one: appending a document
        (torch's padding) keeps every earlier document's ids."""
        g = self.generator("text", microbatch)
        return torch.randint(0, max(vocab_size, 1), (tokens,), generator=g)

    def image_patches(self, microbatch: int, document: int, item: int, patches: int, patch_dim: int) -> torch.Tensor:
        """Flattened pixel patches of one image, (patches, patch_dim), float32."""
        return self._normal((patches, patch_dim), "image", microbatch, document, item)

    def video_latents(self, microbatch: int, document: int, item: int, tokens: int, channels: int) -> torch.Tensor:
        """Clean latent tokens x0 of one clip, (tokens, channels), float32."""
        return self._normal((tokens, channels), "latent", microbatch, document, item)

    def diffusion_noise(self, microbatch: int, document: int, item: int, tokens: int, channels: int) -> torch.Tensor:
        """The noise added to one clip's latents (the DiT's regression target), (tokens, channels)."""
        return self._normal((tokens, channels), "noise", microbatch, document, item)

    def diffusion_timestep(self, microbatch: int, document: int, item: int) -> float:
        """Diffusion time of one clip in [0.02, 0.98] (cosine schedule)."""
        u = torch.rand(1, generator=self.generator("timestep", microbatch, document, item)).item()
        return 0.02 + 0.96 * float(u)


def cosine_alpha(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(signal, noise) scales of the cosine schedule at time t: x_t = a * x0 + s * noise."""
    angle = t * (math.pi / 2)
    return torch.cos(angle), torch.sin(angle)
