"""What the model sees and which elements count, per model type: plain flow matching, or the TI2V-5B objective.

Flow matching (every model): input ``x_t = (1 - t) * x0 + t * noise``, target ``noise - x0``, timestep ``1000 * t``
for every token of a sample. The I2V / FLF2V models get their image conditioning as extra input channels
(``batch["conditioning"]``), so for them the objective is the plain one too.

TI2V-5B (one model for text-to-video and image-to-video, as Wan 2.2's ``wan/textimage2video.py`` and diffusers'
Wan pipelines with ``expand_timesteps`` run it): an image-to-video item has the clean latents of its first frame as
the first latent frame of the model input (``(1 - mask) * x0 + mask * x_t``, the mask 0 on that frame), the tokens of
that frame get timestep 0 (per-token timesteps ``[B, L]``, the mask subsampled by the 2 x 2 patch as the reference
does), and that frame is left out of the loss (the per-sample mean runs over the other frames only, as DiffSynth-
Studio's Wan 2.2 training does): the model is never asked to predict the frame it is given. The causal Wan 2.2 VAE
encodes the first frame of a window alone, so the cached video latents already hold the conditioning frame.
A text-to-video item is plain flow matching on every frame.

Which items are image-to-video: each video item with probability ``ti2v_image_ratio``, drawn from (seed, epoch,
position of its batch in the epoch, its slot in the global batch) only, so a resumed run and any number of processes
make the same choices as one uninterrupted process. An item of a single latent frame (an image, or a window of 1 to 4
frames) is always text-to-video: all of it would be the given frame. Validation draws the same way from its own seed
and epoch 0, so each validation item keeps its choice across evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_STREAM = 0x7132  # keeps these draws apart from the other per-item draws (caption dropout) of the same positions


@dataclass(frozen=True)
class ModelInputs:
    """One micro-batch as the model sees it and which of its elements the loss counts."""

    noisy: torch.Tensor
    """[B, C, F, H, W] model input."""
    timesteps: torch.Tensor
    """[B] (one timestep per sample) or [B, L] per token, 0..1000."""
    loss_mask: torch.Tensor | None = None
    """[B, 1, F, 1, 1]: 1 where the loss counts, 0 on given frames; None counts everything."""


class FlowMatchingObjective:
    """Every model but the TI2V-5B: the input and timesteps as drawn, every element in the loss."""

    name = "flow_matching"

    def model_inputs(self, latents: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor,
                     batch: dict[str, Any], epoch: int, patch: tuple[int, int, int]) -> ModelInputs:  # fmt: skip
        return ModelInputs(noisy, timesteps)


@dataclass
class TI2VObjective:
    """The TI2V-5B: a share ``image_ratio`` of the video items image-to-video (see the module docstring)."""

    image_ratio: float
    seed: int
    name = "ti2v"

    def image_rows(self, batch: dict[str, Any], epoch: int, frames: int, size: int | None = None) -> torch.Tensor:
        """[B] bool: which of the ``size`` samples of the batch (default: its keys) are image-to-video."""
        if size is None:
            size = len(batch["keys"]) if "keys" in batch else int(batch["latents"].shape[0])
        if frames < 2 or self.image_ratio <= 0:
            return torch.zeros(size, dtype=torch.bool)
        position = int(batch.get("batch_index", 0))
        offset = int(batch.get("share_offset", 0))
        draws = [np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, position, offset + slot, _STREAM]).random()
                 for slot in range(size)]  # fmt: skip
        return torch.tensor([d < self.image_ratio for d in draws], dtype=torch.bool)

    def model_inputs(self, latents: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor,
                     batch: dict[str, Any], epoch: int, patch: tuple[int, int, int]) -> ModelInputs:  # fmt: skip
        rows = self.image_rows(batch, epoch, latents.shape[2], latents.shape[0]).to(latents.device)
        if not bool(rows.any()):
            return ModelInputs(noisy, timesteps)
        return first_frame_inputs(latents, noisy, timesteps, rows, patch)


def first_frame_inputs(latents: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor, rows: torch.Tensor,
                       patch: tuple[int, int, int]) -> ModelInputs:  # fmt: skip
    """The ``rows`` samples with their first latent frame clean at timestep 0 and out of the loss.

    ``latents`` / ``noisy`` [B, C, F, H, W], ``timesteps`` [B], ``rows`` [B] bool -> per-token timesteps [B, L] with
    L = F / pt * H / ph * W / pw (the other rows keep their timestep on every token)."""
    b, _, f, h, w = latents.shape
    keep = torch.ones(b, 1, f, h, w, device=latents.device, dtype=latents.dtype)  # 1: noised, 0: the given frame
    keep[rows, :, 0] = 0
    model_input = (1 - keep) * latents + keep * noisy
    grid = keep[:, 0, ::patch[0], ::patch[1], ::patch[2]]  # [B, F', H', W'] one value per token
    per_token = grid.flatten(1).to(torch.float32) * timesteps.to(torch.float32).view(b, 1)  # [B, L]
    loss_mask = keep[:, :, :, :1, :1]  # [B, 1, F, 1, 1]
    return ModelInputs(model_input, per_token, loss_mask)


DEFAULT_IMAGE_RATIO = 0.5


def objective_for(model_type: str, image_ratio: float | None, seed: int) -> FlowMatchingObjective | TI2VObjective:
    """The objective of a model type; ``image_ratio`` is ``ti2v_image_ratio`` (None: 0.5), which only the TI2V-5B
    takes (set for another model it is a ``UserError``)."""
    if model_type == "ti2v":
        return TI2VObjective(DEFAULT_IMAGE_RATIO if image_ratio is None else float(image_ratio), seed)
    if image_ratio is not None:
        from ..errors import UserError

        raise UserError(f"`ti2v_image_ratio` = {image_ratio}: only the Wan 2.2 TI2V-5B trains text- and image-to-"
                        f"video in one model; the DiT (`dit`) is a {model_type} model: remove the key")
    return FlowMatchingObjective()
