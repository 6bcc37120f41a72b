"""Saving LoRA files and state folders on the configured triggers, with retention.

- ``save_every_n_steps`` -> ``{output_name}-step00000100.safetensors`` (+ ``-state/`` with ``save_state``);
- ``save_every_n_epochs`` -> ``{output_name}-000002.safetensors`` (+ ``-state/``), named as kohya / musubi-tuner do;
- end of training -> ``{output_name}.safetensors`` (+ a final ``-step…-state/`` with ``save_state``);
- SIGINT / SIGTERM -> ``-step…`` LoRA and state, whatever ``save_state`` says, so the run can be resumed;
- a run stopped by non-finite losses saves nothing: the last good files stay as they are.

With two networks (Wan 2.2, ``dual_lora_mode = "separate"``) every LoRA name gets the expert suffix:
``{output_name}_high_noise-step00000100.safetensors``, ``{output_name}_low_noise.safetensors``.
Enhancements add files beside each LoRA save (``extra_saves``): ``{LoRA name}{suffix}.safetensors``, e.g.
``{output_name}-step00000100-ema.safetensors``, removed with it by the retention rules.
``save_last_n_steps`` deletes step saves more than N steps older than the newest (as musubi-tuner: with
``save_every_n_steps = 100``, ``save_last_n_steps = 300`` at step 500 keeps 200..500); ``save_last_n_epochs``
keeps the last N epoch saves.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...common.logger import get_logger
from ...enhancements.base import SaveRequest
from ...errors import UserError
from ...networks.formats import build_lora_metadata, save_lora
from ...networks.metadata import portable_config_toml, publish_metadata, without_training_facts
from ...utils.atomic import DiskFullError, is_disk_full
from .. import checkpoint_io as io
from ..experts import DEFAULT, HIGH_NOISE, LOW_NOISE
from .base import Handler

logger = get_logger(__name__)

_EXTRA_SUFFIX = re.compile(r"-[a-z][a-z0-9_]*")

_NETWORK_META_KEYS = ("network_module", "network_dim", "network_alpha", "use_rslora", "network_dropout", "rank_dropout",
                      "module_dropout", "network_args", "loraplus_lr_ratio", "dual_lora_mode")


class CheckpointHandler(Handler):
    name = "checkpointing"

    def __init__(self, cfg: Any, config_text: str, resolution: tuple[int, int] | None = None):
        self.saving = cfg.saving
        self.model_cfg = cfg.model
        self.network_cfg = cfg.network
        self.timestep_cfg = cfg.timesteps
        self.config_text = config_text
        self.metadata_cfg = cfg.metadata
        self.lora_config_text = config_text if cfg.metadata.metadata_full_paths else portable_config_toml(cfg)
        self.resolution = resolution
        self.output_dir = Path(self.saving.output_dir)
        self.written: list[Path] = []
        self._state_saved_at: int | None = None

    # -- triggers --------------------------------------------------------------------------------
    def on_step_end(self, trainer: Any) -> None:
        every = self.saving.save_every_n_steps
        if trainer.last_step is not None and trainer.last_step.skipped:
            return  # a step with a non-finite loss is never saved; the last good save stays the newest
        if every and trainer.state.step % every == 0 and trainer.state.step < trainer.total_steps:
            self.save(trainer, step=trainer.state.step, with_state=self.saving.save_state)
            self._retain_steps(trainer, trainer.state.step)

    def on_epoch_end(self, trainer: Any) -> None:
        every = self.saving.save_every_n_epochs
        if every and trainer.state.epoch % every == 0 and trainer.state.step < trainer.total_steps:
            self.save(trainer, epoch=trainer.state.epoch, with_state=self.saving.save_state)
            self._retain_epochs(trainer)

    def on_train_end(self, trainer: Any) -> None:
        step = trainer.state.step
        if trainer.stop_reason == "completed":
            self.save(trainer, with_state=False)
            if self.saving.save_state and self._state_saved_at != step:
                with trainer.stop.deferred():
                    self.save_state(trainer, io.save_name(self.saving.output_name, step=step))
        elif trainer.stop_reason == "interrupted":
            self.save(trainer, step=step, with_state=self._state_saved_at != step)
            state = self.output_dir / f"{io.save_name(self.saving.output_name, step=step)}-state"
            logger.warning("interrupted at step %d: state saved to %s; continue with resume = \"%s\" or "
                           "auto_resume = true", step, state, state)

    # -- saving ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _disk_errors(self, target: Path) -> Iterator[None]:
        """A full disk (or quota) while writing ``target`` is a ``UserError``; earlier files stay as they were."""
        try:
            yield
        except (OSError, DiskFullError) as exc:
            if not isinstance(exc, DiskFullError) and not is_disk_full(exc, self.output_dir):
                raise
            tmp = io.tmp_folder_for(target)
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else "no space left"
            raise UserError(
                f"no space left in {self.output_dir} while saving {target.name} ({detail}); the earlier "
                "saves are unchanged: free some space (or lower save_last_n_steps / save_last_n_epochs) and "
                "resume from the newest state"
            ) from None

    def save(self, trainer: Any, *, step: int | None = None, epoch: int | None = None, with_state: bool) -> None:
        """The LoRA file(s) and, ``with_state``, a state folder; no signal interrupts it (``stop.deferred``)."""
        with trainer.stop.deferred():
            self._save(trainer, step=step, epoch=epoch, with_state=with_state)

    def _save(self, trainer: Any, *, step: int | None, epoch: int | None, with_state: bool) -> None:
        main = trainer.accelerator.is_main_process
        for group in trainer.groups:
            # A sharded network (FSDP) gathers its weights with a collective: every process calls save_weights,
            # the main process writes the file.
            if group.network is None or not (main or group.network.collective_save):
                continue
            suffix = "" if len(trainer.groups) == 1 else f"_{group.name}"
            name = io.save_name(self.saving.output_name, step=step, epoch=epoch, suffix=suffix)
            path = self.output_dir / f"{name}.safetensors"
            metadata = self.metadata(trainer, group.name, name)
            with self._disk_errors(path):
                group.network.save_weights(path, metadata, self.network_cfg.save_precision)
            if not main:
                continue
            self.written.append(path)
            logger.info("saved %s", path)
            self._save_extras(trainer, SaveRequest(group.name, name, trainer.state.step), metadata)
        if with_state:
            self.save_state(trainer, io.save_name(self.saving.output_name, step=step, epoch=epoch))
        trainer.accelerator.wait_for_everyone()

    def _save_extras(self, trainer: Any, request: SaveRequest, metadata: dict[str, str]) -> None:
        """The enhancements' files beside one LoRA save (``{name}{suffix}.safetensors``, e.g. the EMA)."""
        for enh in trainer.enhancements:
            for extra in enh.extra_saves(request):
                if not _EXTRA_SUFFIX.fullmatch(extra.suffix):
                    raise ValueError(f"{enh.name}: extra save suffix {extra.suffix!r} must match {_EXTRA_SUFFIX.pattern}")
                if extra.suffix not in type(enh).save_suffixes:
                    raise ValueError(f"{enh.name}: extra save suffix {extra.suffix!r} is not in its save_suffixes "
                                     f"{type(enh).save_suffixes} (the run-folder checks read them)")
                path = self.output_dir / f"{request.name}{extra.suffix}.safetensors"
                meta = {**metadata, **extra.metadata}
                with self._disk_errors(path):
                    save_lora(path, extra.state_dict, meta, self.network_cfg.save_precision)
                self.written.append(path)
                logger.info("saved %s", path)

    def save_state(self, trainer: Any, name: str) -> Path:
        """Write ``{name}-state/`` atomically (every process adds its own random state and data position, and its
        FSDP shard)."""
        final = self.output_dir / f"{name}-state"
        sd = trainer.state_dict()
        accelerator = trainer.accelerator
        tmp = io.tmp_folder_for(final)
        if accelerator.is_main_process:
            with self._disk_errors(final):
                io.begin_state_folder(final)
                io.write_main_part(tmp, io.payload_from_state(sd, self.config_text))
        accelerator.wait_for_everyone()
        with self._disk_errors(final):
            io.write_rank_part(tmp, trainer.rank, sd["rank"])
            trainer.write_shards(tmp)  # FSDP: every process writes its shard (a collective)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with self._disk_errors(final):
                io.finish_state_folder(tmp, final, {"step": trainer.state.step, "epoch": trainer.state.epoch})
            logger.info("saved state %s", final)
        accelerator.wait_for_everyone()
        self._state_saved_at = trainer.state.step
        self.written.append(final)
        return final

    def metadata(self, trainer: Any, group: str, title: str) -> dict[str, str]:
        m, t = self.model_cfg, self.timestep_cfg
        lo, hi = t.min_timestep or 0, t.max_timestep if t.max_timestep is not None else 1000
        boundary = trainer.experts.boundary
        base = m.dit_high_noise if group == HIGH_NOISE else m.dit
        if group == HIGH_NOISE:
            lo = max(lo, round(boundary * 1000))
        elif group == LOW_NOISE:
            hi = min(hi, round(boundary * 1000))
        elif trainer.experts.names == [HIGH_NOISE]:
            base = m.dit_high_noise
        extra = {"ss_experts": ",".join(trainer.experts.names), "ss_expert_steps": self._expert_steps(trainer)}
        model_type = trainer.model.config.model_type
        extra["ss_model_type"] = model_type  # t2v, i2v, flf2v, i2v_a14b, ti2v (read from the DiT)
        if group != DEFAULT:
            extra["ss_expert"] = group
        if boundary is not None:
            extra["ss_timestep_boundary"] = f"{boundary * 1000:g}"
        meta = build_lora_metadata(
            config_toml=self.lora_config_text,
            network={k: getattr(self.network_cfg, k) for k in _NETWORK_META_KEYS},
            steps=trainer.state.step,
            epochs=trainer.state.epoch,
            target_model="wan22" if model_type == "ti2v" else m.target_model,  # the 5B is Wan 2.2 whatever the key
            base_model=base,
            title=title,
            resolution=self.resolution,
            timestep_range=(int(lo), int(hi)),
            extra={**extra, "ss_output_name": self.saving.output_name},
        )
        meta.update(publish_metadata(self.metadata_cfg, title))
        return without_training_facts(meta) if self.metadata_cfg.no_metadata else meta

    @staticmethod
    def _expert_steps(trainer: Any) -> str:
        return ",".join(f"{k}={v}" for k, v in trainer.state.expert_steps.items())

    # -- retention -------------------------------------------------------------------------------
    def _retain_steps(self, trainer: Any, step: int) -> None:
        keep = self.saving.save_last_n_steps
        if not keep or not trainer.accelerator.is_main_process:
            return
        saves = io.saved_steps(self.output_dir, self.saving.output_name, "step")
        io.remove_saves([p for n, paths in saves.items() if n < step - keep for p in paths])

    def _retain_epochs(self, trainer: Any) -> None:
        keep = self.saving.save_last_n_epochs
        if not keep or not trainer.accelerator.is_main_process:
            return
        saves = io.saved_steps(self.output_dir, self.saving.output_name, "epoch")
        old = sorted(saves)[:-keep]
        io.remove_saves([p for n in old for p in saves[n]])

    def state_dict(self) -> dict[str, Any]:
        return {}
