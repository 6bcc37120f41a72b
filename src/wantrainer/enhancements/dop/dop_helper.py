"""Differential output preservation (DOP), as ai-toolkit's ``diff_output_preservation``.

For the items whose caption holds ``dop_trigger_word``, the class prompt is that caption with the trigger replaced
by ``dop_class_word`` (encoded by ``cache-text`` beside the item's text cache as ``{stem}_wan_te_wtdop
.safetensors``; never by loading UMT5 during training). On every micro-batch, on the same noisy latents and
timesteps as the training loss:

    base = DiT(x_t, t, class prompt) with the LoRA off (no grad)
    dop  = dop_weight * sum_{items with a class prompt} mean((DiT+LoRA(x_t, t, class prompt) - base) ** 2) / B

which is added to the training loss. With ``dop_prompt = "blank"`` every item's class prompt is the empty prompt
(the one caption dropout uses), so no cache is needed.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ...common.logger import get_logger
from ...criteria.training_loss import masked_per_sample_mean
from ...errors import UserError
from ..base import BaseEnhancement, ItemCache, RunContext, StepContext, TextVariant
from ..registry import register
from .config import DopConfig

logger = get_logger(__name__)

SUFFIX = "_wtdop"
"""Beside ``{stem}_wan_te.safetensors``: ``{stem}_wan_te_wtdop.safetensors`` (musubi-tuner writes no ``_wt*``)."""


def trigger_pattern(trigger: str) -> re.Pattern[str]:
    """The trigger as a whole word (where its ends are word characters), case-sensitive."""
    left = r"(?<!\w)" if re.match(r"\w", trigger) else ""
    right = r"(?!\w)" if re.search(r"\w$", trigger) else ""
    return re.compile(left + re.escape(trigger) + right)


def class_caption(caption: str, trigger: str, class_word: str) -> str | None:
    """The caption with every trigger replaced by ``class_word`` (spaces tidied); None without the trigger."""
    pattern = trigger_pattern(trigger)
    if not pattern.search(caption):
        return None
    return re.sub(r"\s{2,}", " ", pattern.sub(class_word, caption)).strip()


@register("dop")
class DopHelper(BaseEnhancement):
    """``enable_dop``: the preservation loss of the module docstring."""

    def __init__(self, cfg: DopConfig):
        self.cfg = cfg
        self.blank = cfg.dop_prompt == "blank"
        self.last: dict[str, float] = {}

    @classmethod
    def from_config(cls, cfg: Any) -> DopHelper | None:
        section: DopConfig = cfg.dop
        return cls(section) if section.enable_dop else None

    def text_cache_variants(self) -> list[TextVariant]:
        if self.blank:
            return []
        trigger, word = self.cfg.dop_trigger_word or "", self.cfg.dop_class_word
        return [TextVariant(SUFFIX, lambda caption: class_caption(caption, trigger, word))]

    def item_caches(self) -> list[ItemCache]:
        return [] if self.blank else [ItemCache("dop_text", SUFFIX, beside="text", missing="none", stack=False)]

    def setup_hooks(self, run: RunContext) -> None:
        if self.blank or run.loader is None:
            return
        items = run.loader.items
        with_dop = sum(1 for item in items if dict(item.extra_paths).get("dop_text") is not None)
        if with_dop == 0:
            raise UserError(f"enable_dop: none of the {len(items)} training item(s) has a class prompt cache "
                            f"(*_wan_te{SUFFIX}.safetensors); check that the captions contain dop_trigger_word = "
                            f"{self.cfg.dop_trigger_word!r} and run `wantrainer cache-text --config <your config>`")
        logger.info("DOP: %d of %d training item(s) have a class prompt (%r -> %r), weight %g", with_dop, len(items),
                    self.cfg.dop_trigger_word, self.cfg.dop_class_word, self.cfg.dop_weight)

    def _class_prompts(self, ctx: StepContext) -> tuple[list[int], list[torch.Tensor]]:
        b = ctx.noisy.shape[0]
        if self.blank:
            empty = ctx.batch["text_embeds"][0][:0]
            return list(range(b)), [empty] * b
        embeds = ctx.item_extra("dop_text") or [None] * b
        rows = [i for i, e in enumerate(embeds) if e is not None]
        return rows, [embeds[i] for i in rows]

    def loss(self, ctx: StepContext) -> tuple[torch.Tensor | None, dict[str, float]]:
        rows, prompts = self._class_prompts(ctx)
        if not rows:
            return None, {}
        index = torch.tensor(rows, device=ctx.noisy.device)
        x, t = ctx.noisy.index_select(0, index), ctx.timesteps.index_select(0, index)
        conditioning = {k: v.index_select(0, index) for k, v in (ctx.batch.get("conditioning") or {}).items()}
        with torch.no_grad(), ctx.network_disabled():
            base = ctx.predict(x, timesteps=t, text_embeds=prompts, conditioning=conditioning)
        pred = ctx.predict(x, timesteps=t, text_embeds=prompts, conditioning=conditioning)
        mask = None if ctx.loss_mask is None else ctx.loss_mask.index_select(0, index)  # TI2V: not the given frame
        per_item = masked_per_sample_mean((pred.float() - base.float()).square(), mask)  # [rows]
        loss = self.cfg.dop_weight * per_item.sum() / ctx.noisy.shape[0]
        self.last = {"loss": float(per_item.mean().detach()), "items": float(len(rows))}
        return loss, {"dop/loss": loss.detach()}

    def get_dop_metrics(self) -> dict[str, float]:
        return {"drift": self.last.get("loss", 0.0)}
