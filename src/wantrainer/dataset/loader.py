"""Batches for training and validation, read from the latent and text caches.

The plan of an epoch (which items form which batch, in which order) is made in the main process from
``seed + epoch``: items are grouped by dataset and latent shape (so a batch never mixes resolutions or
frame counts), repeated ``num_repeats`` times, shuffled within their group, cut into batches, and the
batches shuffled. Validation data is never shuffled. DataLoader workers only read files, and start from a
forkserver (``worker_context``), so they never hold the trainer's model pages. ``state_dict()``
records the epoch and the next batch, so a resumed run continues with exactly the batch an uninterrupted
run would have seen.

Under DDP with N processes the plan is made for global batches of ``batch_size x N`` items, exactly as one
process with that batch size would make it (same shuffle, same caption dropout), and rank r keeps the slice
``[r*B:(r+1)*B]`` of each: N processes x B see the same global batches as 1 process x N*B, the ranks' shares
are disjoint and every rank gets the same number of batches. A bucket's short last global batch is split
evenly when its size divides by N; otherwise it is left out of that epoch (logged at debug level; the
items differ from epoch to epoch when shuffling). With ``split_uneven`` (validation, whose loop has no
collectives) nothing is left out: such a batch is split as evenly as it goes, the first ranks taking one
item more, and a rank whose share is empty skips that batch, so ranks may see different numbers of batches.
Each batch says where its share sits in the global batch (``batch_index``, ``share_offset``,
``global_batch_size``), so per-batch randomness drawn for the global batch can be sliced the same way.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..common.logger import get_logger
from ..errors import UserError
from ..models.wan.conditioning import CONDITIONING
from .blueprint import DatasetSpec
from .cache_format import load_conditioning, load_latent_cache, load_text_cache
from .cached_items import CachedItem, CacheReport, discover_all

logger = get_logger(__name__)

BatchPlan = tuple[tuple[int, bool], ...]
"""One batch: (item index, caption dropped) per sample."""


class PlannedShare(NamedTuple):
    """This rank's share of one global batch: its plan and where it sits in the global batch."""

    plan: BatchPlan
    batch_index: int
    """Position of the global batch in the epoch."""
    offset: int
    """Index of this share's first sample in the global batch."""
    global_size: int


def share_of(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """(offset, count) of ``rank``'s share of ``size`` items split over ``world_size`` ranks, the first
    ``size % world_size`` ranks taking one more."""
    base, extra = divmod(size, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


class CachedBatchReader(Dataset):
    """Reads one planned batch from disk (runs in DataLoader workers when there are any); with ``conditioning``
    (``models.wan.conditioning.CONDITIONING``) also the cached image conditioning, as ``batch["conditioning"]``:
    ``y`` [B, 20, F, H, W] (mask + image latents) and ``clip_fea`` [B, tokens, D] / [B, frames, tokens, D]."""

    def __init__(self, items: list[CachedItem], conditioning: tuple[str, ...] = (), item_caches: tuple[Any, ...] = ()):
        self.items = items
        self.conditioning = conditioning
        self.item_caches = item_caches
        """The enhancements' per-item caches (``enhancements.base.ItemCache``): ``batch["item_extras"]``."""

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, share: PlannedShare) -> dict[str, Any]:
        latents, embeds, weights, keys = [], [], [], []
        extras: dict[str, list[torch.Tensor]] = {}
        for index, dropped in share.plan:
            item = self.items[index]
            latent, _ = load_latent_cache(item.latent_path)
            latents.append(latent.to(torch.float32))
            for kind, tensor in (load_conditioning(item.latent_path, self.conditioning) if self.conditioning else {}).items():
                extras.setdefault(kind, []).append(tensor.to(torch.float32))
            text = load_text_cache(item.text_path).to(torch.float32)
            embeds.append(text[:0].clone() if dropped else text)
            weights.append(item.loss_weight)
            keys.append(item.key)
        batch = {
            "latents": torch.stack(latents),  # [B, 16, F, H, W]
            "text_embeds": embeds,  # B x [L, D]
            "loss_weight": torch.tensor(weights, dtype=torch.float32),  # [B]
            "keys": keys,
            "batch_index": share.batch_index,
            "share_offset": share.offset,
            "global_batch_size": share.global_size,
        }
        if extras:
            names = {"image": "y", "clip": "clip_fea"}
            batch["conditioning"] = {names[kind]: torch.stack(values) for kind, values in extras.items()}
        if self.item_caches:
            batch["item_extras"] = self._item_extras([self.items[index] for index, _ in share.plan])
        return batch

    def _item_extras(self, items: list[CachedItem]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for cache in self.item_caches:
            values = [_read_item_tensor(dict(item.extra_paths).get(cache.name), cache.tensor) for item in items]
            if cache.stack and all(v is not None for v in values):
                out[cache.name] = torch.stack(values)
            else:
                out[cache.name] = values
        return out


def _read_item_tensor(path: Any, tensor: str | None) -> torch.Tensor | None:
    """The float32 tensor ``tensor`` (or the only one) of an enhancement's per-item cache file."""
    if path is None:
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        if tensor is None and len(keys) != 1:
            raise UserError(f"{path} holds {len(keys)} tensors, one was expected; delete it and cache it again")
        name = keys[0] if tensor is None else tensor
        if name not in keys:
            raise UserError(f"{path} has no tensor {name!r}; delete it and cache it again")
        return handle.get_tensor(name).to(torch.float32)


class _PlanSampler(Sampler):
    """Yields the batches its owner sets before each pass (the DataLoader's sampler cannot be swapped)."""

    def __init__(self) -> None:
        self.plans: list[PlannedShare] = []

    def __iter__(self) -> Iterator[PlannedShare]:
        return iter(list(self.plans))

    def __len__(self) -> int:
        return len(self.plans)


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


WORKER_PRELOAD = ["wantrainer.dataset.loader"]
"""Imported once by the forkserver (torch with it), so each worker starts from a process that has them."""


def worker_context(start_method: str | None = None) -> Any:
    """The start method of the DataLoader workers: ``start_method``, else "forkserver" where the platform has it
    (Linux, macOS).

    A worker forked from the training process would inherit its pages: once the model is loaded, every page the
    trainer later frees or rewrites (converted weights, the first step's temporaries) stays alive in each worker
    and counts in its memory. The forkserver is a fresh interpreter that imports only ``WORKER_PRELOAD``; the
    workers fork from it, so they hold none of the model, whenever they start (each epoch without
    ``persistent_data_loader_workers``). Elsewhere (Windows) workers are spawned, which inherits nothing either.
    """
    import multiprocessing

    method = start_method or ("forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None)
    if method is None:
        return None
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(WORKER_PRELOAD)
    return context


class CachedDataLoader:
    """Iterable of batches with a resumable position. See the module docstring."""

    def __init__(
        self,
        items: list[CachedItem],
        batch_sizes: dict[int, int],
        num_repeats: dict[int, int],
        *,
        seed: int,
        shuffle: bool,
        num_workers: int = 0,
        persistent_workers: bool = False,
        start_method: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        split_uneven: bool = False,
        reports: list[CacheReport] | None = None,
        conditioning: tuple[str, ...] = (),
        item_caches: tuple[Any, ...] = (),
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.items = items
        self.batch_sizes = batch_sizes
        self.num_repeats = num_repeats
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.split_uneven = split_uneven
        self.reports = reports or []
        self.epoch = 0
        self.position = 0
        """Index of the next batch of this rank in the current epoch."""
        self._reader = CachedBatchReader(items, conditioning, tuple(item_caches))
        self._groups = self._group_items()
        self.global_batches, self._batches, self.left_out = self._count_batches()
        self._sampler = _PlanSampler()
        self._loader = None
        if num_workers > 0:
            # Its own generator: starting an epoch's workers never draws from the process-wide torch generator.
            generator = torch.Generator().manual_seed(seed)
            self._loader = DataLoader(self._reader, batch_size=None, sampler=self._sampler, num_workers=num_workers,
                                      persistent_workers=persistent_workers, collate_fn=_identity,
                                      generator=generator, multiprocessing_context=worker_context(start_method))

    def _group_items(self) -> list[tuple[tuple[int, tuple[int, int, int]], list[int]]]:
        groups: dict[tuple[int, tuple[int, int, int]], list[int]] = {}
        for index, item in enumerate(self.items):
            groups.setdefault((item.dataset_index, item.latent_shape), []).append(index)
        return sorted(groups.items())

    def _splits(self, size: int) -> bool:
        return self.split_uneven or size % self.world_size == 0

    def _count_batches(self) -> tuple[int, int, int]:
        """(Global batches per epoch, this rank's batches per epoch, items per epoch left out because a short last
        batch does not split)."""
        batches = mine = left_out = 0
        for (dataset, _), indices in self._groups:
            pool = len(indices) * self.num_repeats[dataset]
            full, rest = divmod(pool, self.batch_sizes[dataset] * self.world_size)
            batches += full
            mine += full
            if rest and self._splits(rest):
                batches += 1
                mine += int(share_of(rest, self.rank, self.world_size)[1] > 0)
            else:
                left_out += rest
        return batches, mine, left_out

    def __len__(self) -> int:
        """This rank's batches per epoch (the same on every rank unless ``split_uneven``)."""
        return self._batches

    def epoch_plan(self, epoch: int) -> list[BatchPlan]:
        """This rank's batches of ``epoch``, in order: its slice of each global batch."""
        return [share.plan for share in self.epoch_shares(epoch)]

    def epoch_shares(self, epoch: int) -> list[PlannedShare]:
        """This rank's shares of the global batches of ``epoch``, in order."""
        rng = random.Random(self.seed + epoch)
        batches: list[list[int]] = []
        for (dataset, _), indices in self._groups:
            pool = indices * self.num_repeats[dataset]
            if self.shuffle:
                rng.shuffle(pool)
            size = self.batch_sizes[dataset] * self.world_size
            batches.extend(pool[i:i + size] for i in range(0, len(pool), size))
        if self.shuffle:
            rng.shuffle(batches)
        shares: list[PlannedShare] = []
        for position, batch in enumerate(batches):
            if not self._splits(len(batch)):
                logger.debug("epoch %d: a last batch of %d item(s) does not split over %d processes: left out",
                             epoch, len(batch), self.world_size)
                continue
            offset, count = share_of(len(batch), self.rank, self.world_size)
            if count:
                plan = self._with_dropout(batch, epoch, position)[offset:offset + count]
                shares.append(PlannedShare(plan, position, offset, len(batch)))
        return shares

    def _with_dropout(self, batch: list[int], epoch: int, position: int) -> BatchPlan:
        plan = []
        for slot, index in enumerate(batch):
            rate = self.items[index].caption_dropout_rate
            dropped = False
            if rate > 0:
                draw = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, position, slot]).random()
                dropped = bool(draw < rate)
            plan.append((index, dropped))
        return tuple(plan)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch (keeps a resumed position when it is the same epoch)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def _roll_over(self) -> None:
        """A finished epoch continues with the next one."""
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._roll_over()
        plans = self.epoch_shares(self.epoch)[self.position:]
        if self._loader is None:
            batches: Iterator[dict[str, Any]] = (self._reader[share] for share in plans)
        else:
            self._sampler.plans = plans
            batches = iter(self._loader)
        for batch in batches:
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        self._roll_over()
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batches_per_epoch": len(self), "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at the saved epoch and next batch."""
        if state.get("seed", self.seed) != self.seed:
            logger.warning("data order: resuming with seed %s, the state was saved with seed %s: the batch order "
                           "differs from the interrupted run", self.seed, state["seed"])
        if state.get("batches_per_epoch", len(self)) != len(self):
            logger.warning("data order: the datasets changed since the state was saved (%s batches per epoch, "
                           "now %d): the epoch continues from the same position", state["batches_per_epoch"], len(self))
        self.epoch = int(state["epoch"])
        self.position = min(int(state["position"]), len(self))


def build_dataloader(
    specs: list[DatasetSpec],
    *,
    seed: int,
    shuffle: bool,
    prior_loss_weight: float = 1.0,
    num_workers: int = 0,
    persistent_workers: bool = False,
    start_method: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    split_uneven: bool = False,
    model_type: str = "t2v",
    item_caches: tuple[Any, ...] = (),
) -> CachedDataLoader:
    """Scan ``specs``, match their caches and return the loader. Raises ``UserError`` when nothing is usable.

    ``split_uneven`` keeps every item under DDP (see the module docstring); only for loops without collectives.
    ``model_type``: the DiT's; its image conditioning is checked in the caches and read with the latents.
    ``item_caches``: the enabled enhancements' per-item cache files (``enhancements.base.ItemCache``).
    ``start_method``: of the workers (default: ``worker_context``'s, which never lets them inherit the model).
    """
    items, reports = discover_all(specs, prior_loss_weight, model_type, item_caches)
    loader = CachedDataLoader(
        items,
        {i: s.batch_size for i, s in enumerate(specs)},
        {i: s.num_repeats for i, s in enumerate(specs)},
        seed=seed, shuffle=shuffle, num_workers=num_workers,
        persistent_workers=persistent_workers and num_workers > 0, start_method=start_method,
        rank=rank, world_size=world_size, split_uneven=split_uneven, reports=reports,
        conditioning=CONDITIONING[model_type], item_caches=tuple(item_caches),
    )
    if loader.global_batches == 0:
        sizes = ", ".join(str(s.batch_size) for s in specs)
        raise UserError(
            f"the {specs[0].split} datasets give no batch for {world_size} processes: each global batch takes "
            f"batch_size x processes items of one bucket (batch_size {sizes}); lower batch_size, raise "
            "num_repeats, add items, or use fewer processes"
        )
    if loader.left_out:
        logger.info("%d item(s) per epoch are left out: their bucket's last batch does not split evenly over %d "
                    "processes", loader.left_out, world_size)
    return loader
