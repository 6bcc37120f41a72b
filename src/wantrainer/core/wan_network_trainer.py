"""``wantrainer train``: build everything from the config, then hand over to ``Trainer``.

Order: accelerator and seed -> enhancements (from the config) -> data loader -> DiT expert(s) on the device ->
LoRA network(s) -> enhancements' hooks -> optimiser(s) and schedule(s) -> loss -> handlers -> resume point.
Every user mistake found here is a ``UserError`` naming the key.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from ..common.logger import get_logger, setup_logging
from ..config_parser import WanTrainerConfig, load_config
from ..errors import UserError
from .checkpoint_io import find_latest_state
from .experts import DEFAULT, Experts, RegimeSampler, load_experts, plan_experts
from .fsdp import make_engine
from .run_folder import claim_output_folder, refuse_or_clear_earlier_run
from .signals import StopRequest
from .state import seeded_generator
from .training_core import Trainer, TrainGroup

logger = get_logger(__name__)

_PRECISION = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def warn_cpu_autocast(mixed_precision: str) -> None:
    """A bf16 / fp16 matmul is 3-100x slower than fp32 on the CPUs without AMX for that dtype measured here (say
    so); with it (a bf16 matmul 9x faster than fp32 on one), autocast uses the CPU's matrix units (say that)."""
    from ..models.wan.cpu_kernels import cpu_flags

    flag = {"bf16": "amx_bf16", "fp16": "amx_fp16"}[mixed_precision]
    if flag in cpu_flags():
        logger.info('mixed_precision = "%s" on the CPU: it has %s, so its %s matmuls use AMX', mixed_precision,
                    flag, mixed_precision)
    else:
        logger.warning('mixed_precision = "%s" on the CPU is very slow without AMX (this CPU has no %s: a %s '
                       'matmul is 3-100x slower than fp32 there); use mixed_precision = "no", and dit_weight_dtype '
                       '= "bf16" for half the RAM', mixed_precision, flag, mixed_precision)


def make_accelerator(cfg: WanTrainerConfig) -> Any:
    from accelerate import Accelerator

    return Accelerator(
        mixed_precision=cfg.model.mixed_precision,
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
    )


def total_steps_for(training_cfg: Any, batches_per_epoch: int) -> int:
    """``max_train_steps``, or ``max_train_epochs`` x optimiser steps per epoch."""
    if training_cfg.max_train_epochs is None:
        return training_cfg.max_train_steps
    return training_cfg.max_train_epochs * math.ceil(batches_per_epoch / training_cfg.gradient_accumulation_steps)


def train_specs(cfg: WanTrainerConfig, model_type: str = "t2v") -> list[Any]:
    """The resolved [[datasets.train]] entries for a ``model_type`` DiT; none is a user error."""
    from ..dataset.blueprint import resolve_datasets

    specs = resolve_datasets(cfg.datasets, "train", model_type)
    if not specs:
        raise UserError("no training data: add a [[datasets.train]] table (see `wantrainer config template`)")
    return specs


def build_loader(cfg: WanTrainerConfig, specs: list[Any], accelerator: Any, model_type: str = "t2v",
                 item_caches: tuple[Any, ...] = ()) -> Any:
    """The training loader; ``item_caches``: the enhancements' per-item cache files read into each batch."""
    from ..dataset.loader import build_dataloader

    t = cfg.training
    return build_dataloader(
        specs,
        seed=t.seed,
        shuffle=True,
        prior_loss_weight=cfg.loss.prior_loss_weight,
        num_workers=t.max_data_loader_n_workers,
        persistent_workers=t.persistent_data_loader_workers,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        model_type=model_type,
        item_caches=item_caches,
    )


def typical_seq_len(spec: Any) -> int:
    """Tokens per latent frame at a dataset's resolution (8x VAE, 16x for the TI2V-5B; 1x2x2 patches)."""
    width, height = spec.resolution
    step = 2 * spec.latent_stride
    return (width // step) * (height // step)


def enable_fp8_matmul(model: Any, device: torch.device) -> None:
    """``fp8_matmul = true``: the fp8 forward matmuls through ``torch._scaled_mm``; refused where they cannot run."""
    from ..models.wan.stored_linear import check_fp8_matmul_device

    missing = check_fp8_matmul_device(device)
    if missing is not None:
        raise UserError(f"`fp8_matmul` = true cannot be honoured: {missing}; remove it (fp8 weights still work "
                        "without it, upcast per layer)")
    layers = model.enable_fp8_matmul()
    logger.info("fp8_matmul: %d block Linear(s) run their forward matmul in fp8 (torch._scaled_mm)", layers)


def build_experts(cfg: WanTrainerConfig, device: torch.device, *, place: bool = True) -> Experts:
    """Load the DiT expert(s), place the model on ``device`` and set the memory features. ``place = False``
    (FSDP): the model stays on the CPU, and sharding moves each unit's shards to ``device``, so no device ever
    holds the whole model."""
    from ..models.wan.attention import check_attn_mode
    from ..models.wan.token_routing import TokenRoute

    m = cfg.model
    check_attn_mode(m.attn_mode, for_training=True)  # e.g. sage_attn has no backward: fail before loading
    if m.compile_blocks:  # a platform that cannot compile fails here, not inside the first step
        from ..models.wan.compile import require_compiler

        require_compiler(device)
    if device.type == "cpu" and m.mixed_precision != "no":
        warn_cpu_autocast(m.mixed_precision)
    experts = load_experts(m, plan_experts(m, cfg.timesteps), _PRECISION[m.mixed_precision],
                           device if place else torch.device("cpu"))
    model = experts.model
    model.requires_grad_(False)
    if m.fp8_matmul:
        enable_fp8_matmul(model, device)
    if m.blocks_to_swap:
        if m.blocks_to_swap >= model.config.num_layers:
            raise UserError(f"`blocks_to_swap` = {m.blocks_to_swap}: the DiT has only {model.config.num_layers} "
                            f"blocks; use at most {model.config.num_layers - 1}")
        model.enable_block_swap(m.blocks_to_swap, device)
        model.move_to_device_except_swap_blocks(device)
    elif place:
        model.to(device)
    if m.gradient_checkpointing:
        model.enable_gradient_checkpointing(cpu_offload=m.gradient_checkpointing_cpu_offload)
    model.enable_token_routing(TokenRoute.from_keys(m.tread_selection_ratio, m.tread_start_layer_idx,
                                                    m.tread_end_layer_idx, model.config.num_layers))
    if m.compile_blocks:
        from ..models.wan.compile import compile_blocks

        compile_blocks(model.blocks)
    model.train()
    # Block swap moves block weights between the CPU and the device on its own: a device-side store of the
    # active expert would keep the swapped blocks' device copies alive, so with block swap the stores stay
    # on the CPU whatever offload_inactive_dit says.
    experts.capture_stores(offload=m.offload_inactive_dit or m.blocks_to_swap > 0)
    return experts


def shard_experts(cfg: WanTrainerConfig, experts: Experts, engine: Any) -> None:
    """FSDP (``distributed_engine = "fsdp"``): shard the DiT before the full fine-tune takes its parameters."""
    if not engine.sharded:
        return
    from ..networks.full import select_parameters

    if experts.is_dual:
        raise UserError('network_module = "full" trains one Wan 2.2 expert at a time: set min_timestep / '
                        "max_timestep on one side of the boundary (or give only that expert's DiT)")
    trained = select_parameters(experts.model, cfg.network.trainable_blocks)
    engine.prepare_model(experts.model, trained, _PRECISION[cfg.model.mixed_precision])
    experts.capture_stores(offload=False)  # the store is the sharded model's own tensors (frees the full ones)


def build_networks(cfg: WanTrainerConfig, experts: Experts, device: torch.device) -> dict[str, Any]:
    """name -> network: "default" (one network for every expert) or one per expert ("separate")."""
    from ..networks.lora_wan import create_network

    generator = seeded_generator(cfg.training.seed)  # the same initial LoRA on every process
    if experts.is_dual and cfg.network.network_module == "full":
        raise UserError('network_module = "full" trains one Wan 2.2 expert at a time: set min_timestep / '
                        "max_timestep on one side of the boundary (or give only that expert's DiT)")
    separate = experts.is_dual and cfg.network.dual_lora_mode == "separate"
    names = experts.names if separate else [DEFAULT]
    networks = {}
    for name in names:
        network = create_network(cfg.network, experts.model, multiplier=1.0, generator=generator)
        network.to(device)
        network.train()
        networks[name] = network
    experts.set_networks({e: networks[e if separate else DEFAULT] for e in experts.names})
    return networks


def build_groups(
    cfg: WanTrainerConfig,
    networks: dict[str, Any],
    regimes: RegimeSampler,
    extra_params: dict[str | None, list[dict[str, Any]]],
    total_steps: int,
    accelerator: Any,
) -> list[TrainGroup]:
    """One optimiser + schedule per network; a separate expert's schedule spans its expected share of steps."""
    from ..optimizers import create_lr_scheduler, create_optimizer

    opt_cfg = cfg.optimizer
    groups = []
    for index, (name, network) in enumerate(networks.items()):
        experts = tuple(regimes.names) if name == DEFAULT else (name,)
        share = sum(regimes.share(e) for e in experts)
        steps = max(1, round(total_steps * share))
        group_cfg = opt_cfg
        if steps != total_steps and isinstance(opt_cfg.lr_warmup_steps, int) and opt_cfg.lr_warmup_steps:
            group_cfg = opt_cfg.model_copy(update={"lr_warmup_steps": max(1, round(opt_cfg.lr_warmup_steps * share))})
        param_groups = network.prepare_optimizer_params(opt_cfg.learning_rate) + extra_params.get(name, [])
        if index == 0:
            param_groups = param_groups + extra_params.get(None, [])
        optimizer = create_optimizer(group_cfg, param_groups)
        network.attach_optimizer(optimizer)
        scheduler = create_lr_scheduler(group_cfg, optimizer, steps)
        params = [p for pg in param_groups for p in pg["params"]]
        groups.append(TrainGroup(name, params, accelerator.prepare_optimizer(optimizer), scheduler, network, experts))
        logger.info("network %s: %d tensors (%.2fM parameters), %d scheduled steps", name, len(params),
                    sum(p.numel() for p in params) / 1e6, steps)
    return groups


def enhancement_param_groups(enhancements: list[Any], lr: float) -> dict[str | None, list[dict[str, Any]]]:
    """The enhancements' own parameters as optimiser groups, by the network whose optimiser steps them (None: the
    first network's). ``trainable_params()`` gives a list (parameters or groups) or a dict network name -> list."""
    groups: dict[str | None, list[dict[str, Any]]] = {}

    def add(name: str | None, params: list[Any]) -> None:
        if params and isinstance(params[0], dict):
            groups.setdefault(name, []).extend({"lr": lr, **g, "params": list(g["params"])} for g in params)
        elif params:
            groups.setdefault(name, []).append({"params": params, "lr": lr})

    for enh in enhancements:
        params = enh.trainable_params()
        if isinstance(params, dict):
            for name, part in params.items():
                add(name, list(part))
        else:
            add(None, list(params))
    return groups


def build_handlers(
    cfg: WanTrainerConfig, accelerator: Any, config_text: str, resolution: tuple[int, int], model_type: str = "t2v",
    *, sharded: bool = False,
) -> list[Any]:
    """Metrics first, checkpointing last (so a saved state includes the other handlers' latest state).

    ``sharded`` (FSDP): every forward pass needs every process, so each process validates on the whole val set
    (the same batches in the same order; the summed sums and counts give the same mean) instead of its slice."""
    from ..dataset.blueprint import resolve_datasets
    from .handlers.checkpointing import CheckpointHandler
    from .handlers.metrics import MetricsHandler
    from .handlers.sampling import SamplingHandler
    from .handlers.validation import ValidationHandler

    handlers: list[Any] = [MetricsHandler()]
    rank, world = (0, 1) if sharded else (accelerator.process_index, accelerator.num_processes)
    val = ValidationHandler.from_config(cfg.validation, resolve_datasets(cfg.datasets, "val", model_type), cfg.loss,
                                        cfg.timesteps, rank=rank, world_size=world, model_type=model_type,
                                        ti2v_image_ratio=cfg.model.ti2v_image_ratio)
    sampling = SamplingHandler.from_config(cfg.sampling, cfg.model, cfg.saving, model_type)
    handlers.extend(h for h in (val, sampling) if h is not None)
    checkpoint = CheckpointHandler(cfg, config_text, resolution)
    if not cfg.saving.save_loss_plot:
        return [*handlers, checkpoint]
    from .handlers.loss_plot import LossHistory, LossPlotWriter

    history = LossHistory()
    return [*handlers, history, checkpoint, LossPlotWriter(history, checkpoint)]


def resume_point(saving_cfg: Any, *, main_process: bool = True) -> Path | None:
    """The state folder to continue from, or None for a run from step 0 (refused over an earlier run's saves)."""
    if saving_cfg.resume is not None:
        return Path(saving_cfg.resume)
    found = find_latest_state(Path(saving_cfg.output_dir), saving_cfg.output_name) if saving_cfg.auto_resume else None
    if found is not None:
        return found
    if main_process:  # the other processes follow the main one (which stops the launch when it refuses)
        refuse_or_clear_earlier_run(saving_cfg)
    if saving_cfg.auto_resume:
        logger.info("auto_resume: no state folder of %s in %s yet; starting from step 0", saving_cfg.output_name,
                    saving_cfg.output_dir)
    return None


def apply_host_memory_settings(model: Any) -> None:
    """``release_freed_memory`` (tunes glibc's allocator now) and ``memory_allocator`` (preloaded by the `train`
    command's restart): say which is in effect in this process, or why not."""
    from ..utils.allocator import effect_warning
    from ..utils.memory import release_freed_blocks

    if model.release_freed_memory and not release_freed_blocks():
        logger.warning("release_freed_memory = true has no effect here (it needs Linux with glibc); training goes on "
                       "with the allocator's defaults")
    if (allocator_warning := effect_warning(model.memory_allocator)) is not None:
        logger.warning(allocator_warning)
    elif model.memory_allocator != "system":
        logger.info("memory allocator: %s (preloaded)", model.memory_allocator)


def build_trainer(cfg: WanTrainerConfig, *, extra_handlers: list[Any] | None = None,
                  accelerator: Any = None, stop: StopRequest | None = None) -> Trainer:
    """Everything ``Trainer`` needs, built from the config."""
    from accelerate.utils import set_seed

    from ..criteria.objectives import objective_for
    from ..criteria.training_loss import TrainingLoss
    from ..enhancements.base import RunContext
    from ..enhancements.registry import build_enhancements
    from ..preflight import require_ready
    from ..scheduling.timesteps import TimestepSampler
    from .handlers.metrics import MetricsLogger

    require_ready(cfg, "train")  # what `validate` checks, before anything is loaded
    apply_host_memory_settings(cfg.model)
    accelerator = accelerator or make_accelerator(cfg)
    resume_from = resume_point(cfg.saving, main_process=accelerator.is_main_process)  # refuses before loading
    metrics = MetricsLogger.from_config(cfg.logging, cfg.saving, enabled=accelerator.is_main_process)
    set_seed(cfg.training.seed)
    device = accelerator.device
    from ..models.wan.conditioning import run_model_type

    model_type = run_model_type(cfg.model)
    objective = objective_for(model_type, cfg.model.ti2v_image_ratio, cfg.training.seed)
    specs = train_specs(cfg, model_type)
    enhancements = build_enhancements(cfg)
    loader = build_loader(cfg, specs, accelerator, model_type,
                          tuple(cache for enh in enhancements for cache in enh.item_caches()))
    engine = make_engine(cfg.training.distributed_engine, accelerator)
    experts = build_experts(cfg, device, place=not engine.sharded)
    shard_experts(cfg, experts, engine)
    regimes = RegimeSampler(TimestepSampler.from_config(cfg.timesteps), experts.names, experts.boundary,
                            seq_len=typical_seq_len(specs[0]))
    total = total_steps_for(cfg.training, len(loader))
    networks = build_networks(cfg, experts, device)
    run = RunContext(model=experts.model, experts=experts, networks=networks, device=device, cfg=cfg,
                     accelerator=accelerator, is_main_process=accelerator.is_main_process, loader=loader)
    for enh in enhancements:
        enh.setup_hooks(run)
    extra = enhancement_param_groups(enhancements, cfg.optimizer.learning_rate)
    if engine.sharded:
        if extra:
            raise UserError('distributed_engine = "fsdp" shards the DiT only: an enhancement with its own trainable '
                            "parameters is on (" + ", ".join(e.name for e in enhancements if e.trainable_params())
                            + '); turn it off or use distributed_engine = "ddp"')
        for network in networks.values():
            network.shard_with(engine)
    groups = build_groups(cfg, networks, regimes, extra, total, accelerator)
    if engine.sharded:
        engine.report_shards(groups[0].params)
    config_text = cfg.to_toml()
    handlers = build_handlers(cfg, accelerator, config_text, specs[0].resolution, model_type, sharded=engine.sharded)
    handlers += list(extra_handlers or [])
    logger.info("training %s for %d steps (%d batches per epoch per process, %d process(es), accumulation %d)",
                "/".join(experts.names), total, len(loader), accelerator.num_processes,
                cfg.training.gradient_accumulation_steps)
    return Trainer(
        accelerator=accelerator,
        experts=experts,
        regimes=regimes,
        groups=groups,
        loader=loader,
        loss_fn=TrainingLoss.from_config(cfg.loss, cfg.timesteps),
        total_steps=total,
        seed=cfg.training.seed,
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        max_grad_norm=cfg.training.max_grad_norm,
        max_nonfinite_steps=cfg.training.max_nonfinite_steps,
        handlers=handlers,
        enhancements=enhancements,
        metrics=metrics,
        cfg=cfg,
        resume_from=resume_from,
        stop=stop,
        objective=objective,
        engine=engine,
    )


def run(args: argparse.Namespace) -> int:
    """CLI entry: train, with a progress bar on the main process. Exit 0 done, 130 / 143 interrupted (SIGINT /
    SIGTERM) after saving a state, 2 a user error; the output folder is locked for the whole command."""
    from ..utils.allocator import restart_with
    from .handlers.progress import ProgressBarHandler

    cfg = load_config(args.config, overrides=args.overrides)
    if getattr(args, "own_process", False):  # before any thread, process group or file: nothing after it here runs
        restart_with(cfg.model.memory_allocator)
    stop = StopRequest()
    stop.phase = "starting"
    with stop.installed():
        accelerator = make_accelerator(cfg)
        # Under DDP only the main process logs at the configured level; the others report warnings and errors.
        setup_logging(cfg.logging.logging_level if accelerator.is_main_process else "WARNING")
        with claim_output_folder(cfg.saving, main_process=accelerator.is_main_process):
            trainer = build_trainer(cfg, accelerator=accelerator, stop=stop)
            if trainer.is_main_process:
                trainer.handlers.append(ProgressBarHandler())
            reason = trainer.train()
            stop.finish()
        if trainer.is_main_process:
            logger.info("training %s at step %d; files in %s", reason, trainer.state.step, cfg.saving.output_dir)
    if reason == "interrupted":
        logger.warning("exit code %d: interrupted by %s after saving a state", stop.exit_code, stop.signal_name)
        return stop.exit_code
    return 0
