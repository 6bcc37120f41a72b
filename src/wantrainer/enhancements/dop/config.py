"""The ``dop_*`` keys: differential output preservation (the class word keeps the base model's prediction)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ...config.base import Section


class DopConfig(Section):
    """Differential output preservation (DOP)"""

    enable_dop: bool = False
    """Keep the LoRA's prediction on the class prompt (the caption with dop_trigger_word replaced by
    dop_class_word, or a blank prompt) equal to the base model's: one extra no-grad forward with the LoRA off and
    one with it on per micro-batch."""
    dop_trigger_word: str | None = None
    """The trigger word in the captions (e.g. "sks"); items whose caption lacks it get no preservation loss."""
    dop_class_word: str = ""
    """What replaces the trigger word in the class prompt (e.g. "woman"; "" removes it). cache-text encodes these
    prompts beside the text caches ({stem}_wan_te_wtdop.safetensors)."""
    dop_weight: float = Field(1.0, gt=0.0)
    """Weight of the preservation loss (mean squared difference of the two predictions)."""
    dop_prompt: Literal["class_word", "blank"] = "class_word"
    """ "class_word": the caption with the trigger replaced; "blank": an empty prompt for every item (no extra
    cache; preserves the unconditional prediction)."""

    def config_problems(self, cfg: Any) -> list[str]:
        problems = []
        fields = type(self).model_fields
        set_keys = sorted(k for k in self.model_fields_set if k != "enable_dop" and getattr(self, k) != fields[k].default)
        if set_keys and not self.enable_dop:
            problems.append(f"`{set_keys[0]}` is set but `enable_dop` is false; set enable_dop = true or remove the "
                            "dop_* keys")
        if self.enable_dop and self.dop_prompt == "class_word" and not (self.dop_trigger_word or "").strip():
            problems.append('`dop_trigger_word` is needed with enable_dop = true and dop_prompt = "class_word" (the '
                            'word of your captions that names the trained concept); or set dop_prompt = "blank"')
        if self.enable_dop and self.dop_prompt == "blank" and self.dop_trigger_word is not None:
            problems.append('`dop_trigger_word` has no effect with dop_prompt = "blank"; remove it or use '
                            'dop_prompt = "class_word"')
        if self.enable_dop and cfg.network.network_module == "full":
            problems.append('`enable_dop` compares the prediction with the LoRA off; network_module = "full" has no '
                            "LoRA to switch off: turn enable_dop off")
        return problems


SECTION = DopConfig
