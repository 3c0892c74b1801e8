"""The training loop: one stage (PT / VPT / IFT) of one run, on Hugging Face Accelerate.

Read top to bottom: :func:`train` runs the weight-free pre-flight and locks the run directory (a
finished run stops here); :func:`setup` builds model + tokenizer (validated against the loaded LLM
before any data is read), freezes per stage, builds the target source (live teachers and/or the
target cache, olavlm.teachers.targets), the dataset and our per-rank batch sampler, the optimizer,
and resumes from the newest intact checkpoint (olavlm.train.rundir); :func:`run_steps` repeats
:func:`train_step` (one optimizer step of ``accum`` micro-batches), logging and checkpointing at
the cadence ``metrics.log_due`` / ``checkpoint.save_due`` decide; :func:`finish` writes
``RUN_DIR/final/`` (the HF-style folder the next stage, ``olavlm chat`` and evaluation load) and
summary.json.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from olavlm.config import ConfigError, RunConfig, explicit_fields
from olavlm.train import checkpoint as ckpt
from olavlm.train.engine import (accumulation_steps, apply_precision_policy, build_accelerator, check_shared_run_dir,
                                 full_parameters, prepare, unpartitioned_loading, uses_engine_state, world_size)
from olavlm.preflight import preflight
from olavlm.train.metrics import MetricsLogger, StepAccumulator, fold_counters, log_due
from olavlm.train.rundir import ResumePlan, RunDirLock, finished_summary, is_writer_rank, plan_resume, resume_state
from olavlm.train.stages import active_tasks, configure_trainable, trainable_parameters, uses_predictors

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path  # the run directory
    final_dir: Path | None  # RUN_DIR/final, or None when the run stopped early (stop_after_steps)
    summary: dict[str, Any]  # the content of summary.json
    model: Any = None  # the trained model (unwrapped from DDP/DeepSpeed), for in-process callers
    already_finished: bool = False  # the run directory held a finished run: nothing was trained


def resolve_init_from(path: str) -> Path:
    """``train.init_from`` may name a run directory (its ``final/`` is used) or a model folder."""
    p = Path(path)
    for candidate in (p / "final", p):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConfigError(f"train.init_from: {path} holds no finished model (no final/config.json or config.json)")


def build_model(cfg: RunConfig):
    """PT starts from ``model.llm`` / ``model.vision_tower``; VPT/IFT load ``init_from``'s final
    folder without predictors (docs/method.md, "Hand-off between stages"). The model checks the config against the loaded LLM and
    tower (layers within depth, token divisibility) while it is built. Returns (model, init_dir)."""
    from olavlm.model import io
    from olavlm.model.vlm import OlaVLM

    t = cfg.train
    if t.stage == "probe":  # the frozen init_from model + one probe per (task, layer)
        from olavlm.evaluation.probe_stage import build_probe_model
        return build_probe_model(cfg)
    active = active_tasks(cfg.model, t.stage)  # a later stage's own (alignment) tasks get fresh predictors
    if t.init_from is None:
        if t.stage != "pt":
            log.warning("train.init_from is not set: %s starts from model.llm with a fresh projector", t.stage)
            model = OlaVLM.from_config(cfg.model, with_predictors=False)
        else:
            return OlaVLM.from_config(cfg.model, with_predictors=True, tasks=list(active)), None
        init_dir = None
    else:
        if t.stage == "pt":
            raise ConfigError("train.init_from: PT starts from model.llm and model.vision_tower; unset init_from")
        init_dir = resolve_init_from(t.init_from)  # runtime fields (dtype, attention) from the recipe, architecture checked
        runtime, _ = io.reconcile_init_from(io.read_config(init_dir)[0], cfg.model, explicit_fields(cfg), str(init_dir))
        model = OlaVLM.from_pretrained(init_dir, with_predictors=False, **runtime)
    if active:
        model.attach_tasks(active)
    return model, init_dir


def build_targets(cfg: RunConfig, model, accelerator=None):
    """The run's :class:`~olavlm.teachers.targets.TargetSource` (live teachers, the target cache, or
    the cache with live gaps), verified against the run; None when this stage predicts nothing.
    Teachers stay outside the engine: full weights on every rank."""
    from olavlm.teachers.targets import TargetSource

    if accelerator is None:
        return TargetSource.for_run(cfg, model)
    return TargetSource.for_run(cfg, model, device=accelerator.device,
                                loading=lambda: unpartitioned_loading(accelerator))


def build_data(cfg: RunConfig, model, targets):
    """Dataset + collator: teacher images when live teachers run, cached targets from the cache."""
    from olavlm.data.collate import Collator
    from olavlm.data.dataset import LlavaDataset
    from olavlm.data.processor import OlaProcessor

    processor = OlaProcessor.for_model(model, cfg.data,
                                       teacher_image_size=targets.teacher_image_size if targets is not None else None)
    dataset = LlavaDataset(cfg.data, processor=processor,
                           target_lookup=targets.lookup if targets is not None else None, seed=cfg.train.seed)
    collator = Collator(model.tokenizer.pad_token_id, target_shapes=targets.collate_shapes if targets else None,
                        pack_length=cfg.data.max_length if cfg.data.packing else None,
                        tokens_per_image=model.tokens_per_image)
    return dataset, collator


def train(cfg: RunConfig, resume: str | None = "auto", *, stop_after_steps: int | None = None,
          force: bool = False) -> TrainResult:
    """Run one stage. ``resume``: "auto" (newest intact checkpoint of the run dir; a finished run
    is left as it is unless ``force``, which trains it again from step 0), a checkpoint folder, or
    "none". ``stop_after_steps``: leave (with a checkpoint, without final/) after that many
    optimizer steps of this invocation, keeping the full schedule (time-sliced jobs). The run
    directory is locked for the whole run (see olavlm.train.rundir)."""

    for note in preflight(cfg):  # every check that needs no weights, before any weights load
        log.info("pre-flight: %s", note)
    t = cfg.train
    accum = accumulation_steps(t.global_batch_size, t.micro_batch_size, world_size())
    run_dir = Path(t.output_dir)
    with RunDirLock(run_dir, enabled=is_writer_rank()):  # one writer per run directory, until the end
        done = finished_summary(run_dir) if resume == "auto" and not force else None
        if done is not None:
            log.warning("%s already finished (step %s of %s; final model in %s): nothing to train, --force trains "
                        "it again from step 0", run_dir, done.get("steps"), done.get("total_steps"), run_dir / "final")
            return TrainResult(output_dir=run_dir, final_dir=run_dir / "final", summary=done, already_finished=True)
        plan = plan_resume(run_dir, "none" if force and resume == "auto" else resume)
        return _train_locked(cfg, accum, run_dir, plan, stop_after_steps)


@dataclass
class Run:
    """Everything one stage trains with, built by :func:`setup`."""
    cfg: RunConfig
    run_dir: Path
    accum: int
    accelerator: Any
    model: Any  # wrapped by the engine (DDP / DeepSpeed / FSDP)
    optimizer: Any
    scheduler: Any
    targets: Any  # TargetSource (live teachers / cache / both, outside the model) or None
    dataset: Any
    collator: Any
    init_dir: Path | None
    counts: dict  # trainable parameter counts per group
    steps_per_epoch: int
    total_steps: int
    state: ckpt.TrainState
    engine_state: bool  # DeepSpeed / FSDP: checkpoints through accelerator.save_state
    logger: MetricsLogger
    tokens_per_image: int
    trainables: list = field(default_factory=list)

    def sampler(self, epoch: int, skip: int):
        from olavlm.data.sampler import build_batch_sampler
        t = self.cfg.train
        return build_batch_sampler(self.cfg.data.sampler, self.dataset.lengths, global_batch_size=t.global_batch_size,
                                   micro_batch_size=t.micro_batch_size, world_size=self.accelerator.num_processes,
                                   rank=self.accelerator.process_index, seed=t.seed, epoch=epoch, skip_batches=skip)

    def batches(self):
        """This epoch's micro-batches from where the state stands (a resumed epoch skips what it saw)."""
        state = self.state
        generator = torch.Generator().manual_seed(self.cfg.train.seed + state.epoch)  # loader seeding off the global RNG
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler(state.epoch, state.step_in_epoch * self.accum),
            collate_fn=self.collator, num_workers=self.cfg.data.num_workers,
            pin_memory=self.accelerator.device.type == "cuda", generator=generator)
        return iter(loader)


def _train_locked(cfg: RunConfig, accum: int, run_dir: Path, plan: ResumePlan,
                  stop_after_steps: int | None) -> TrainResult:
    """:func:`train` once the run directory is locked and the resume candidates are known."""
    run = setup(cfg, accum, run_dir, plan)
    loop_start, wall_before = time.perf_counter(), run.state.wall_time
    run_steps(run, stop_after_steps, lambda: wall_before + time.perf_counter() - loop_start)
    run.state.wall_time = wall_before + time.perf_counter() - loop_start
    return finish(run)


def setup(cfg: RunConfig, accum: int, run_dir: Path, plan: ResumePlan) -> Run:
    """Model (frozen per stage), accelerator, target source, data, optimizer + schedule, resumed state."""
    from accelerate.utils import set_seed

    from olavlm.model import lora
    t = cfg.train
    lora.check_config(cfg)
    set_seed(t.seed)
    model, init_dir = build_model(cfg)
    model.max_length = cfg.data.max_length
    if t.lora is not None:  # adapters on the LLM; checkpoints then hold adapters + extras only
        lora.apply_lora(model, t.lora, base=init_dir)
    counts = configure_trainable(model, t.stage, t)
    accelerator = build_accelerator(t, accum, no_split_modules=getattr(model.llm, "_no_split_modules", None))
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    check_shared_run_dir(accelerator, run_dir)  # every rank writes into it (checkpoint shards, RNG states)
    apply_precision_policy(model, t)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()  # non-reentrant: gradients reach the spliced inputs anyway
        if t.stage == "pt":
            model.llm.enable_input_require_grads()
    targets = build_targets(cfg, model, accelerator)
    dataset, collator = build_data(cfg, model, targets)
    run = Run(cfg=cfg, run_dir=run_dir, accum=accum, accelerator=accelerator, model=model, optimizer=None,
              scheduler=None, targets=targets, dataset=dataset, collator=collator, init_dir=init_dir, counts=counts,
              steps_per_epoch=0, total_steps=0, state=ckpt.TrainState(), engine_state=False,
              logger=None, tokens_per_image=model.tokens_per_image)
    run.steps_per_epoch = len(run.sampler(0, 0)) // accum
    if run.steps_per_epoch < 1:
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is larger than the dataset "
                          f"({len(dataset)} samples in {cfg.data.train_file})")
    run.total_steps = t.max_steps if t.max_steps is not None else run.steps_per_epoch * t.epochs
    _prepare_optimization(run)
    run.engine_state = uses_engine_state(accelerator)  # known once the engine has wrapped or sharded the model
    run.state, resume_from = resume_state(cfg, plan, accelerator, run.model, run.optimizer, run.scheduler,
                                          engine_state=run.engine_state, accum=accum,
                                          steps_per_epoch=run.steps_per_epoch)
    if accelerator.is_main_process:
        log.info("stage %s: %d optimizer steps (%d per epoch), global batch %d = micro %d x world %d x accum %d",
                 t.stage, run.total_steps, run.steps_per_epoch, t.global_batch_size, t.micro_batch_size,
                 accelerator.num_processes, accum)
    run.logger = MetricsLogger(run_dir, report_to=t.report_to, total_steps=run.total_steps, start_step=run.state.step,
                               enabled=accelerator.is_main_process, run_name=t.run_name, config=cfg.to_dict())
    run.trainables = [p for p in run.model.parameters() if p.requires_grad]
    if resume_from is not None:
        ckpt.restore_rng(resume_from, accelerator.process_index)  # last: nothing may draw from RNG after this
    return run


def _prepare_optimization(run: Run) -> None:
    """AdamW over the trainable parameters, both wrapped by the engine, and the LR schedule."""
    from transformers import get_scheduler

    t = run.cfg.train
    optimizer = torch.optim.AdamW(trainable_parameters(run.model), lr=t.learning_rate, betas=tuple(t.adam_betas),
                                  eps=t.adam_eps, weight_decay=t.weight_decay)
    run.model, run.optimizer = prepare(run.accelerator, run.model, optimizer, t)  # DDP / DeepSpeed wrap; FSDP shards
    run.scheduler = get_scheduler(t.lr_scheduler, run.optimizer, num_training_steps=run.total_steps,
                                  num_warmup_steps=math.ceil(t.warmup_ratio * run.total_steps))


def train_step(run: Run, batches, tracker: StepAccumulator) -> float:
    """One optimizer step of ``run.accum`` micro-batches from ``batches``; returns the LR it used."""
    accelerator, model, optimizer, grad_norm = run.accelerator, run.model, run.optimizer, None
    for _ in range(run.accum):
        batch = next(batches)
        with accelerator.accumulate(model):
            out = model(**model_inputs(batch, accelerator.device, run.targets))
            accelerator.backward(out.loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(run.trainables, run.cfg.train.max_grad_norm or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        tracker.add_metrics(out.metrics)
        tracker.add_counts(samples=len(batch["sample_ids"]), tokens=batch_tokens(batch, run.tokens_per_image))
        tracker.add_skipped(batch.get("skipped"))
        if run.targets is not None:
            tracker.add_counts(**run.targets.take_counts())  # cache gaps filled live / images without a target
    lr = run.scheduler.get_last_lr()[0]  # the rate this step used
    run.scheduler.step()
    if grad_norm is not None:
        tracker.add_metrics({"grad_norm": torch.as_tensor(grad_norm, dtype=torch.float32)})
    return lr


def run_steps(run: Run, stop_after_steps: int | None, wall_time) -> None:
    """Optimizer steps until the schedule ends or ``stop_after_steps`` of this invocation are done,
    logging and checkpointing as the cadence helpers decide; ``wall_time()``: the run's seconds so far."""
    t, state = run.cfg.train, run.state
    tracker, epoch_skipped, steps_this_run, interval_start = StepAccumulator(), {}, 0, time.perf_counter()
    run.model.train()
    while state.step < run.total_steps and (stop_after_steps is None or steps_this_run < stop_after_steps):
        batches = run.batches()
        while state.step_in_epoch < run.steps_per_epoch and state.step < run.total_steps:
            lr = train_step(run, batches, tracker)
            state.step, state.step_in_epoch, steps_this_run = state.step + 1, state.step_in_epoch + 1, steps_this_run + 1
            run.logger.advance()
            stopping = stop_after_steps is not None and steps_this_run >= stop_after_steps and state.step < run.total_steps
            saving = ckpt.save_due(state.step, t.save_every, run.total_steps, stopping=stopping)
            # counters reach the state (and the log) at least at every save, epoch end and the last step
            if log_due(state.step, t.log_every, run.total_steps,
                       forced=saving or state.step_in_epoch >= run.steps_per_epoch):
                values = fold_counters(tracker.reduce(run.accelerator), state, epoch_skipped, lr,
                                       time.perf_counter() - interval_start)
                interval_start = time.perf_counter()
                if run.targets is not None:
                    run.targets.add_logged(values)
                run.logger.log(state.step, values)
            if saving:
                state.wall_time = wall_time()
                ckpt.save_checkpoint(run.accelerator, run.model, run.optimizer, run.scheduler,
                                     ckpt.at_epoch_boundary(state, run.steps_per_epoch), run.run_dir,
                                     keep_last=t.keep_last, engine_state=run.engine_state, config=run.cfg.to_dict())
            if stopping:
                break
        if state.step_in_epoch >= run.steps_per_epoch:
            run.logger.epoch_end(state.epoch, epoch_skipped)
            state.epoch, state.step_in_epoch, epoch_skipped = state.epoch + 1, 0, {}


def finish(run: Run) -> TrainResult:
    """``final/`` when the schedule is done, then summary.json and the result."""
    state, accelerator, finished = run.state, run.accelerator, run.state.step >= run.total_steps
    final_dir = (save_final(run.cfg, accelerator, run.model, run.run_dir, run.init_dir, run.dataset.processor)
                 if finished else None)
    summary = {
        "stage": run.cfg.train.stage, "finished": finished, "steps": state.step, "total_steps": run.total_steps,
        "epochs_completed": state.epoch, "samples": state.samples, "tokens": state.tokens,
        "skipped": state.skipped, "wall_time_s": round(state.wall_time, 3),
        "samples_per_s": state.samples / max(state.wall_time, 1e-9),
        "tokens_per_s": state.tokens / max(state.wall_time, 1e-9),
        "world_size": accelerator.num_processes, "accumulation": run.accum, "trainable": run.counts,
        "final_dir": str(final_dir) if final_dir else None,
    }
    if run.targets is not None:
        summary["targets"] = run.targets.summary()  # mode + gaps of this invocation
        if accelerator.is_main_process:
            run.targets.report()
    run.logger.close(summary if finished else None)
    accelerator.wait_for_everyone()
    return TrainResult(output_dir=run.run_dir, final_dir=final_dir, summary=summary,
                       model=accelerator.unwrap_model(run.model))


def batch_tokens(batch: dict, tokens_per_image: int) -> int:
    """Sequence tokens the model sees: non-padding text + image/task-token expansion."""
    n = int(batch["attention_mask"].sum())
    if "num_images" in batch:
        n += int(batch["num_images"].sum()) * (tokens_per_image - 1)
    return n


def model_inputs(batch: dict, device: torch.device, targets=None) -> dict[str, Any]:
    """The model's forward arguments for one micro-batch; ``targets`` (a TargetSource) adds
    ``targets`` + ``target_mask``, computed outside the (wrapped) model."""
    inputs = {k: batch[k].to(device, non_blocking=True)
              for k in ("input_ids", "labels", "attention_mask", "pixel_values", "num_images", "segment_ids") if k in batch}
    if targets is not None:
        inputs.update(targets.batch_targets(batch, device))
    return inputs


def save_final(cfg: RunConfig, accelerator, model, run_dir: Path, init_dir: Path | None, processor=None) -> Path:
    """``RUN_DIR/final/``: model (+ predictors after PT), tokenizer and the processor
    (``olavlm_processor.json``: template, BOS policy, geometry, image facts + the run's provenance)."""
    from olavlm.data.processor import OlaProcessor

    final = run_dir / "final"
    accelerator.wait_for_everyone()
    with full_parameters(accelerator, model) as whole:  # the model with whole parameters (main process)
        if accelerator.is_main_process:
            whole.save_pretrained(final, with_predictors=uses_predictors(cfg.train.stage))
            run = {"stage": cfg.train.stage, "max_length": cfg.data.max_length,
                   "init_from": str(init_dir) if init_dir else None, "run_dir": str(run_dir)}
            proc = processor or OlaProcessor.for_model(accelerator.unwrap_model(model), cfg.data)
            dataclasses.replace(proc, run=run).save_pretrained(final)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        log.info("final model written to %s", final)
    return final
