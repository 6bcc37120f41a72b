"""[masked_training]: the loss weighted by per-item masks, optionally keeping the base model's prediction outside
them. Torch-free (the schema is read without it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from ...config.base import Section

if TYPE_CHECKING:  # pragma: no cover
    from ...config_parser import WanTrainerConfig


class MaskedTrainingConfig(Section):
    """Masked training with prior preservation (masks: mask_directory in a [[datasets.train]] table)"""

    use_masked_training_with_prior: bool = False
    """Weight the loss by the masks of the datasets' mask_directory (white = learn): 1 inside, unmasked_weight outside; with masked_prior_preservation_weight > 0 also keep the base model's prediction outside the masks."""
    unmasked_weight: float = Field(0.0, ge=0.0, le=1.0)
    """Loss weight where the mask is black (0: ignored; a grey mask value m gets m + (1 - m) x unmasked_weight)."""
    normalize_masked_area_loss: bool = False
    """Divide each item's masked loss by its mean weight (and the prior term by the mean of 1 - m), so an item with a small mask counts as much as one with a large mask."""
    masked_prior_preservation_weight: float = Field(0.0, ge=0.0)
    """Outside the masks, also pull the prediction towards the base model's (the LoRA switched off), with this weight times (1 - m); one extra no-grad forward per micro-batch. 0: off."""

    def config_problems(self, cfg: WanTrainerConfig) -> list[str]:
        from ...dataset.blueprint import merged_entry

        general, problems = cfg.datasets.general, []
        train = [merged_entry(general, entry) for entry in cfg.datasets.train]
        val = [(i, merged_entry(general, entry)) for i, entry in enumerate(cfg.datasets.val)]
        masked = [i for i, entry in enumerate(train) if entry.mask_directory is not None]
        if not self.use_masked_training_with_prior:
            keys = ("unmasked_weight", "masked_prior_preservation_weight", "normalize_masked_area_loss")
            changed = [k for k in keys if getattr(self, k) != type(self).model_fields[k].default]
            problems += [f"`{k}` has no effect without `use_masked_training_with_prior = true`" for k in changed]
            if masked:
                problems.append(f"`datasets.train[{masked[0]}].mask_directory` is set but masked training is off: set "
                                "`use_masked_training_with_prior = true` to train with the masks, or remove the key")
            return problems
        if not masked:
            problems.append("`use_masked_training_with_prior = true` but no [[datasets.train]] table has a "
                            "`mask_directory`: add one (one mask per item, same stem; white = learn)")
        for index, entry in val:
            if entry.mask_directory is not None:
                problems.append(f"`datasets.val[{index}]` has a `mask_directory` (set there or in [datasets.general]): "
                                "validation loss is measured on the whole frame; set `mask_directory` in the "
                                "[[datasets.train]] tables only")
        return problems


SECTION = MaskedTrainingConfig
