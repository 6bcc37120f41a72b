"""The enhancement protocol: optional training features plug into the loop through these hooks only.

An enhancement lives in its own folder ``enhancements/<feature>/`` (see ``registry``), is built from the config
by ``from_config`` (``None`` when the config leaves it off) and is called by the trainer at fixed points; the loop
and the loss never name one. Every hook has a no-op default in ``BaseEnhancement``:

0. ``text_cache_variants()`` / ``text_cache_prompts()`` in ``cache-text``: more text caches per item from
   rewritten captions, and fixed prompts (``PromptSet``);
   ``pixel_caches()`` in ``cache-latents``: per-item files computed from the clean pixels (encoder features);
1. ``item_caches()`` when the data loader is built: extra per-item cache files read into every batch
   (``batch["item_extras"][name]``), e.g. masks beside the latent cache or a second text cache;
2. ``setup_hooks(run)`` once, after the DiT and the network(s) are built (keep references, register taps);
3. ``trainable_params()`` once: its own parameters, a list for the first network's optimiser or a dict network
   name -> list for each network's own (e.g. one REPA projector per separate Wan 2.2 expert LoRA);
4. ``modify_inputs(batch)`` on every micro-batch, before noise is added;
   ``modify_noised(ctx)`` on every micro-batch, after noise and timesteps are drawn and before the forward pass:
   may replace the model's inputs and the target in ``ctx`` (e.g. self-correction's rolled-out states);
5. ``loss_weight(ctx)`` on every micro-batch, after the forward pass: a per-element weight broadcastable to the
   prediction [B, C, F, H, W], multiplied into the criterion's element loss before its reduction (the weights
   of several enhancements multiply); ``None`` for no weight;
6. ``loss(ctx)`` on every micro-batch: an extra loss term and its metrics. ``ctx.predict(...)`` runs one more
   forward pass, ``ctx.network_disabled()`` switches the trained network off around it (the base model's
   prediction, e.g. for preservation losses);
7. ``on_step_end(step)`` after every optimiser step (``StepEnd``: which networks changed);
8. ``get_<name>_metrics()`` (optional) after every step: scalars logged as ``<name>/<key>`` in TensorBoard and
   shown on the progress bar;
9. ``extra_saves(save)`` at every LoRA save: more files beside it (``{lora name}{suffix}.safetensors``), written
   atomically by the checkpoint handler under the run's naming, retention and lock rules;
10. ``evaluation_variants(purpose)``: extra weight sets validation / sampling also run with (e.g. the EMA);
11. ``state_dict()`` / ``load_state_dict()``: its part of the resume state;
12. ``remove_hooks()`` when training ends: afterwards the model and the networks are exactly as before
    ``setup_hooks``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..config_parser import WanTrainerConfig
    from ..core.state import TrainState


@dataclass(frozen=True)
class ItemCache:
    """A per-item tensor file an enhancement adds beside an item's latent or text cache.

    The file of an item is ``{cache file stem}{suffix}.safetensors`` beside the ``beside`` cache (e.g. beside
    ``img_0064x0064_wan.safetensors`` with ``suffix = "_wtmask"``: ``img_0064x0064_wan_wtmask.safetensors``).
    Suffixes must not be one musubi-tuner writes (``_wan``, ``_wan_te``). ``tensor``: the tensor's name in the
    file (``None``: the file's only tensor). The batch holds ``batch["item_extras"][name]``: a [B, ...] tensor
    when ``stack`` (equal shapes), else a list of B tensors; with ``missing = "none"`` an item without the file
    gives ``None`` in a list (``stack`` is ignored then), with ``"skip"`` the item is left out of training and
    reported like a missing text cache.
    """

    name: str
    suffix: str
    beside: Literal["latent", "text"] = "latent"
    tensor: str | None = None
    missing: Literal["skip", "none"] = "skip"
    stack: bool = True
    datasets: Callable[[Any], bool] | None = None
    """Which datasets (``dataset.blueprint.DatasetSpec``) have this file; the items of the others get ``None``
    whatever is on disk, and are never skipped for it. ``None``: every dataset. Must pickle (a module-level function,
    not a lambda): data-loader workers start from a forkserver and receive the item caches pickled."""
    is_current: Callable[[Path, Path], bool] | None = None
    """``(file, the item's latent cache) -> bool``: False for a file made with other settings (stale), which counts
    as missing (``PixelCache.item_cache`` sets it). ``None``: any file is current. Must pickle, as ``datasets``."""
    command: str = ""
    """The command that writes the file, named in the report of items without it (``wantrainer cache-latents``)."""

    def applies_to(self, spec: Any) -> bool:
        return self.datasets is None or bool(self.datasets(spec))

    def path_for(self, latent_path: Path, text_path: Path) -> Path:
        base = Path(latent_path if self.beside == "latent" else text_path)
        return base.with_name(f"{base.stem}{self.suffix}.safetensors")


@dataclass(frozen=True)
class TextVariant:
    """A second text cache per item that ``cache-text`` encodes: the item's caption rewritten by ``caption_for``
    (``None``: this item has none; an old file of it is removed), written as ``{text cache stem}{suffix}
    .safetensors`` beside the item's text cache in the text cache's format (read back with an ``ItemCache`` of
    ``beside = "text"`` and the same suffix)."""

    suffix: str
    caption_for: Callable[[str], str | None]


@dataclass(frozen=True)
class PixelCache:
    """A per-item tensor file that ``cache-latents`` computes from each item's clean pixels (e.g. the features of a
    frozen image encoder), so training never decodes latents: ``{latent cache stem}{suffix}.safetensors`` beside the
    latent cache (suffix ``_wt...``, as for ``ItemCache``), holding the tensor ``tensor`` and the metadata
    ``signature`` plus ``latent_shape`` (the item's latent F x H x W). An existing file is current when both match
    the run's (with ``skip_existing`` current files are kept; stale ones are encoded again). ``load(device)`` runs
    once, only when some item needs its file: it loads the encoder and returns ``encode(pixels)``, pixels
    [B, 3, F, H, W] in [-1, 1] at the item's bucket size -> a [B, ...] tensor (or a list of B tensors).
    ``item_cache()`` is the matching ``ItemCache`` for training (a stale file counts as missing there)."""

    name: str
    suffix: str
    tensor: str
    signature: dict[str, str]
    load: Callable[[torch.device], Callable[[torch.Tensor], Any]]

    def path_for(self, latent_path: Path) -> Path:
        latent_path = Path(latent_path)
        return latent_path.with_name(f"{latent_path.stem}{self.suffix}.safetensors")

    def metadata(self, latent_shape: tuple[int, ...]) -> dict[str, str]:
        return {**self.signature, "latent_shape": "x".join(str(int(n)) for n in latent_shape)}

    def state(self, path: Path, latent_shape: tuple[int, ...]) -> Literal["missing", "current", "stale"]:
        """"missing", "current" (the file holds ``tensor`` and this signature and latent shape) or "stale"."""
        return pixel_cache_state(path, self.tensor, self.metadata(latent_shape))

    def item_cache(self, missing: Literal["skip", "none"] = "skip", stack: bool = True) -> ItemCache:
        check = PixelCacheCheck(self.tensor, tuple(sorted(self.signature.items())))
        return ItemCache(self.name, self.suffix, "latent", self.tensor, missing, stack, is_current=check,
                         command="wantrainer cache-latents --config <your config>")


def pixel_cache_state(path: Path, tensor: str, metadata: dict[str, str]) -> Literal["missing", "current", "stale"]:
    """A ``PixelCache`` file's state: "current" when it holds ``tensor`` and every ``metadata`` value."""
    if not Path(path).is_file():
        return "missing"
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
    except Exception:  # unreadable or truncated: encode it again
        return "stale"
    return "current" if tensor in keys and all(meta.get(k) == v for k, v in metadata.items()) else "stale"


@dataclass(frozen=True)
class PixelCacheCheck:
    """``ItemCache.is_current`` of a ``PixelCache`` (a plain object, so it pickles into data-loader workers)."""

    tensor: str
    signature: tuple[tuple[str, str], ...]

    def __call__(self, path: Path, latent_path: Path) -> bool:
        from ..dataset.cache_format import read_latent_shape

        shape = "x".join(str(n) for n in read_latent_shape(latent_path))
        return pixel_cache_state(path, self.tensor, {**dict(self.signature), "latent_shape": shape}) == "current"


@dataclass(frozen=True)
class PromptSet:
    """Fixed prompts an enhancement needs encoded (e.g. a slider's prompt pairs): ``cache-text`` writes them into
    one file ``{cache_directory of the first [[datasets.train]]}/{file_name}``, one tensor [L, 4096] per key with
    the prompt text under the same key in the metadata; ``prompt_set_path`` / ``load_prompt_set`` read it back.
    ``file_name`` must start with ``_wt`` and end in ``.safetensors`` without ``_wan_te`` (so no other tool's or
    caching rule's file can have that name)."""

    file_name: str
    prompts: dict[str, str]


def prompt_set_path(cfg: WanTrainerConfig, file_name: str) -> Path:
    """Where ``cache-text`` writes a ``PromptSet`` of this config."""
    from ..dataset.blueprint import resolve_datasets

    specs = resolve_datasets(cfg.datasets, "train")
    if not specs:
        from ..errors import UserError

        raise UserError("no [[datasets.train]] table: its cache_directory holds the enhancements' prompt caches")
    return Path(specs[0].cache_directory) / file_name


def load_prompt_set(cfg: WanTrainerConfig, prompts: PromptSet) -> dict[str, torch.Tensor]:
    """The encoded prompts of ``prompts`` (float32 [L, 4096] each); ``UserError`` naming ``cache-text`` when the
    file is missing or was encoded from other texts."""
    from safetensors import safe_open

    from ..errors import UserError

    path = prompt_set_path(cfg, prompts.file_name)
    if not path.is_file():
        raise UserError(f"{path} is missing: run `wantrainer cache-text --config <your config>` to encode the "
                        f"{len(prompts.prompts)} prompt(s) this feature needs")
    with safe_open(str(path), framework="pt") as handle:
        recorded = handle.metadata() or {}
        stale = [k for k, text in prompts.prompts.items() if recorded.get(k) != text or k not in handle.keys()]
        if stale:
            raise UserError(f"{path} holds other texts for {stale[0]!r} than the config (the prompts changed): run "
                            "`wantrainer cache-text --config <your config>` again")
        return {k: handle.get_tensor(k).to(torch.float32) for k in prompts.prompts}


@dataclass
class RunContext:
    """What ``setup_hooks`` gets: the built run. ``networks``: name -> network ("default", or "high_noise" /
    "low_noise" for separate Wan 2.2 LoRAs); ``experts.network_for(name)`` gives an expert's network."""

    model: torch.nn.Module
    experts: Any
    networks: dict[str, Any]
    device: torch.device
    cfg: WanTrainerConfig
    accelerator: Any = None
    is_main_process: bool = True
    loader: Any = None
    """The training data loader (``loader.items``: the ``CachedItem``s with their ``extra_paths``)."""


@dataclass
class StepEnd:
    """What ``on_step_end`` gets after an optimiser step."""

    state: TrainState
    expert: str
    skipped: bool
    """The step had a non-finite loss: no network changed."""
    updated: tuple[str, ...]
    """The networks the optimiser updated (empty when skipped)."""

    @property
    def step(self) -> int:
        return self.state.step


@dataclass
class ExtraSave:
    """One file an enhancement adds beside a LoRA save: ``{lora name}{suffix}.safetensors``, written with
    ``networks.formats.save_lora`` (kohya keys, the save precision) and the LoRA's metadata updated by
    ``metadata``. ``suffix``: ``-`` then lower-case letters, digits or ``_`` (``-ema``)."""

    suffix: str
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SaveRequest:
    """The LoRA save an ``extra_saves`` call belongs to: network ``network`` saved as ``{name}.safetensors``."""

    network: str
    name: str
    step: int


@dataclass
class EvaluationVariant:
    """A weight set validation / sampling also run with: ``label`` names its metrics / files (``ema``);
    ``applied()`` swaps the weights in for the duration of the ``with`` block and restores them exactly."""

    label: str
    applied: Callable[[], contextlib.AbstractContextManager[None]]


@dataclass
class StepContext:
    """What one micro-batch's forward pass produced; passed to every loss term.

    Shapes: ``latents`` / ``noise`` / ``noisy`` / ``target`` / ``pred`` are [B, C, F, H, W]; ``t`` is [B] in
    (0, 1) and ``timesteps`` what the model saw: 1000 * t [B], or per token [B, L] (TI2V-5B image-to-video items,
    0 on the given first frame). ``loss_mask`` [B, 1, F, 1, 1] is 1 where a loss term should count (None: all).
    ``network`` is the active expert's trained network.
    """

    batch: dict[str, Any]
    latents: torch.Tensor
    noise: torch.Tensor
    noisy: torch.Tensor
    target: torch.Tensor
    t: torch.Tensor
    timesteps: torch.Tensor
    pred: torch.Tensor | None = None
    model: torch.nn.Module | None = None
    network: Any = None
    expert: str = "default"
    step: int = 0
    loss_mask: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    """Free space for enhancements to pass tensors from ``modify_inputs`` / forward taps to ``loss``."""
    element_weight: torch.Tensor | None = None
    """The product of the enhancements' ``loss_weight`` hooks (set by the trainer before the criterion runs)."""
    backward: Callable[[torch.Tensor], None] | None = None
    """Backpropagate a term now, with the micro-batch's accumulation scale: for a term whose graph depends on a
    temporary network state (a multiplier set for one forward pass, which gradient checkpointing would recompute
    with the restored state). Return such a term detached from ``loss`` (it is then only logged)."""
    forward: Callable[..., torch.Tensor] | None = None
    """The trainer's forward pass ``(model, x, timestep, context, conditioning) -> pred`` (autocast, fp32 out)."""

    def predict(self, x: torch.Tensor | None = None, *, timesteps: torch.Tensor | None = None,
                text_embeds: list[torch.Tensor] | None = None,
                conditioning: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """One more forward pass of the active expert (with the network as it is now; wrap it in
        ``network_disabled()`` and ``torch.no_grad()`` for the base model's prediction). Unset arguments are
        this micro-batch's: ``noisy``, ``timesteps``, ``batch["text_embeds"]``, ``batch["conditioning"]``."""
        assert self.forward is not None and self.model is not None, "StepContext built without a forward pass"
        return self.forward(
            self.model,
            self.noisy if x is None else x,
            self.timesteps if timesteps is None else timesteps,
            self.batch["text_embeds"] if text_embeds is None else text_embeds,
            self.batch.get("conditioning") if conditioning is None else conditioning,
        )

    @contextlib.contextmanager
    def network_disabled(self) -> Iterator[None]:
        """The trained network switched off (the base model) inside the block; see ``network_disabled``."""
        with network_disabled(self.network):
            yield

    def item_extra(self, name: str) -> Any:
        """``batch["item_extras"][name]`` (an ``ItemCache`` of some enhancement), ``None`` when absent."""
        return self.batch.get("item_extras", {}).get(name)

    def __getitem__(self, key: str) -> Any:
        """Mapping-style access (``ctx["t"]``) for criteria written against a dict."""
        if key in self.extras:
            return self.extras[key]
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: str) -> bool:
        return key in self.extras or hasattr(self, key)


@contextlib.contextmanager
def network_disabled(network: Any) -> Iterator[None]:
    """The network's contribution off inside the block (the model computes its base prediction exactly), restored
    after. Networks that cannot be switched off (a full fine-tune is the model itself) raise ``UserError``."""
    disable = getattr(network, "network_disabled", None)
    if disable is None:
        from ..errors import UserError

        raise UserError(f"this feature needs the base model's prediction, which a {type(network).__name__} cannot "
                        "give (it has no adapter to switch off); train a LoRA-family network_module")
    with disable():
        yield


@runtime_checkable
class Enhancement(Protocol):
    name: str
    replaces_training_loss: bool

    @classmethod
    def from_config(cls, cfg: WanTrainerConfig) -> Enhancement | None: ...

    def text_cache_variants(self) -> list[TextVariant]: ...

    def pixel_caches(self) -> list[PixelCache]: ...

    def text_cache_prompts(self) -> list[PromptSet]: ...

    def item_caches(self) -> list[ItemCache]: ...

    def setup_hooks(self, run: RunContext) -> None: ...

    def remove_hooks(self) -> None: ...

    def trainable_params(
        self,
    ) -> Iterable[torch.nn.Parameter] | list[dict[str, Any]] | dict[str, list[torch.nn.Parameter]]: ...

    def modify_inputs(self, batch: dict[str, Any]) -> dict[str, Any]: ...

    def modify_noised(self, ctx: StepContext) -> None: ...

    def loss_weight(self, ctx: StepContext) -> torch.Tensor | None: ...

    def loss(self, ctx: StepContext) -> tuple[torch.Tensor | None, dict[str, float]]: ...

    def on_step_end(self, step: StepEnd) -> None: ...

    def extra_saves(self, save: SaveRequest) -> list[ExtraSave]: ...

    def evaluation_variants(self, purpose: Literal["validation", "sampling"]) -> list[EvaluationVariant]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BaseEnhancement:
    """No-op defaults: an enhancement overrides only the hooks it needs."""

    name = "enhancement"
    save_suffixes: tuple[str, ...] = ()
    """The suffixes of the files ``extra_saves`` writes (``("-ema",)``): the run-folder checks read them to know
    an earlier run's saves, whatever features that run had on."""
    replaces_training_loss = False
    """True: the run trains only this enhancement's terms (a concept slider): the trainer skips the training forward
    pass and the criterion, ``ctx.pred`` is ``None`` and ``loss_weight`` is not called."""

    @classmethod
    def from_config(cls, cfg: WanTrainerConfig) -> BaseEnhancement | None:
        return None

    def text_cache_variants(self) -> list[TextVariant]:
        return []

    def pixel_caches(self) -> list[PixelCache]:
        return []

    def text_cache_prompts(self) -> list[PromptSet]:
        return []

    def item_caches(self) -> list[ItemCache]:
        return []

    def setup_hooks(self, run: RunContext) -> None:
        return None

    def remove_hooks(self) -> None:
        return None

    def trainable_params(self) -> list[torch.nn.Parameter]:
        return []

    def modify_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return batch

    def modify_noised(self, ctx: StepContext) -> None:
        return None

    def loss_weight(self, ctx: StepContext) -> torch.Tensor | None:
        return None

    def loss(self, ctx: StepContext) -> tuple[torch.Tensor | None, dict[str, float]]:
        return None, {}

    def on_step_end(self, step: StepEnd) -> None:
        return None

    def extra_saves(self, save: SaveRequest) -> list[ExtraSave]:
        return []

    def evaluation_variants(self, purpose: Literal["validation", "sampling"]) -> list[EvaluationVariant]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def feature_metrics(enhancement: Any) -> dict[str, float]:
    """``get_<name>_metrics()`` of an enhancement (when it has one), keyed ``<name>/<key>``."""
    getter = getattr(enhancement, f"get_{enhancement.name}_metrics", None)
    if getter is None:
        return {}
    return {f"{enhancement.name}/{k}": float(v) for k, v in dict(getter() or {}).items()}
