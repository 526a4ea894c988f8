"""The training loop: phases in order, steps of forward/backward over micro-batches, optimizer updates,
metrics, validation and checkpoints. The same code runs one process or any 3D-parallel layout.

`Trainer` holds one collaborator per job, built by `Trainer.build` and passed in: ``model`` (`ModelState`, the
layout's context, chunks, loss, optimizer), ``runner`` (`StepRunner`, one update, validation), ``checkpointer``
(`Checkpointer`), ``resume`` (`ResumePlanner`, where the run starts), ``health`` (`HealthGuard`, which returns
`HealthDecision` values), ``metrics`` (`MetricsReporter`, the one read-back per logging step), ``stops``
(`StopController`), ``profiler`` (`StepProfiler`) and ``logger`` (`MetricsLogger`). This module keeps the run,
the phase loop and the step loop; they read top to bottom, and an early end (a stop request, an unhealthy stop,
a rollback) travels up as a returned `Ending`, raised as an exception only by `run`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from internlm.data import Tokenizer, build_train_loader, build_valid_batches
from internlm.evaluation.evaluator import Evaluator
from internlm.parallel import ParallelContext
from internlm.planning import peak_tflops

from .banner import banner, final_line
from .build import build_step_schedule
from .checkpointer import Checkpointer
from .distributed import Launch
from .fp16_metrics import fp16_metrics
from .health import CONTINUE, HealthDecision, HealthGuard, UnhealthyStop
from .lr_schedule import beta2_at, warmup_cosine_lr
from .metrics import MetricsLogger, warnings_to_log
from .metrics_reporter import MetricsReporter
from .model_state import ModelState
from .phases import Phase, Progress
from .profiling import StepProfiler
from .resume import ResumePlanner
from .run_watch import RunWatch
from .step_runner import StepRunner
from .stop import Aborted, StopController, StopRequested


@dataclass(frozen=True)
class Ending:
    """Why an attempt ended before its phases did: ``error`` for `Trainer.run` to raise (`StopRequested`,
    `UnhealthyStop`), or a rollback to checkpoint ``rollback_to``."""

    error: Optional[Exception] = None
    rollback_to: Optional[str] = None

    @classmethod
    def of(cls, decision: HealthDecision) -> "Ending":
        """The ending of a health decision that does not proceed (stop, or roll back)."""
        if decision.action == "rollback":
            return cls(rollback_to=decision.path)
        return cls(error=UnhealthyStop(decision.reason))


class Trainer:
    """Runs the phases of one command with the collaborators of the module docstring (see `build`)."""

    def __init__(
        self,
        phases: List[Phase],
        work_dir: str,
        model_config: Any,
        model: ModelState,
        runner: StepRunner,
        checkpointer: Checkpointer,
        resume: ResumePlanner,
        health: HealthGuard,
        metrics: MetricsReporter,
        stops: StopController,
        profiler: StepProfiler,
        logger: MetricsLogger,
        watch: Optional[RunWatch] = None,
        evaluator: Optional[Evaluator] = None,
    ) -> None:
        self.phases = phases
        self.work_dir = work_dir
        self.model_config = model_config  # the run's model (every phase trains the same one)
        self.model = model
        self.runner = runner
        self.checkpointer = checkpointer
        self.resume = resume
        self.health = health
        self.metrics = metrics
        self.stops = stops
        self.profiler = profiler
        self.logger = logger
        self.watch = watch or RunWatch.off()  # hang watchdog, straggler detector, alerts (run_watch.py)
        self.evaluator = evaluator  # the evaluation section's tasks (internlm/evaluation); None: none
        self.progress = Progress()  # global steps and tokens so far, the history of started phases
        self.last_val_loss: Optional[float] = None

    @classmethod
    def build(cls, phases: List[Phase], launch: Launch, pc: ParallelContext) -> "Trainer":
        """The trainer of ``phases`` on this process; ``pc``: the parallel context of the first phase's layout.
        Installs the SIGTERM / SIGINT handlers (`StopController`). Run-wide settings are the first phase's: the
        CLI checks that every phase shares work_dir and the model."""
        run_wide, device = phases[0].config, launch.device
        monitor = run_wide.monitor
        logger = MetricsLogger(run_wide.work_dir, pc.rank == 0, monitor.tensorboard, wandb=monitor.wandb)
        torch.manual_seed(run_wide.seed)
        if device.type == "cuda":
            torch.backends.cudnn.deterministic = run_wide.cudnn_deterministic
            torch.backends.cudnn.benchmark = run_wide.cudnn_benchmark
        ckpt, model_config = run_wide.ckpt, run_wide.model_config
        checkpointer = Checkpointer(ckpt.save_ckpt_folder, ckpt.keep_last, model_config, pc, logger)
        # training health (health.py): non-finite steps, loss spikes, data.skip_batches, rollbacks
        skip_texts = [p.config.data.skip_batches for p in phases]
        health = HealthGuard(run_wide.health, skip_texts, ckpt.save_ckpt_folder, pc.rank == 0, logger)
        peak = peak_tflops(device, run_wide.monitor.peak_tflops)  # None: MFU is not reported
        metrics = MetricsReporter(logger, device, model_config, peak, sum(p.steps for p in phases))
        profiler = StepProfiler(run_wide.profile, run_wide.work_dir, device, pc.rank, logger.message)
        stops = StopController(ckpt.enable_save_ckpt, pc.rank, logger)
        stops.install_handlers()
        resume = ResumePlanner(phases, run_wide.work_dir, ckpt, pc.rank, checkpointer, health, logger)
        model = ModelState(pc, device, logger)
        watch = RunWatch.build(run_wide, pc.rank, pc.world_size, device)
        runner = StepRunner(device, timer=watch.stragglers)
        return cls(
            phases,
            run_wide.work_dir,
            model_config,
            model,
            runner,
            checkpointer,
            resume,
            health,
            metrics,
            stops,
            profiler,
            logger,
            watch,
            Evaluator(run_wide.evaluation, logger.log, logger.message, Tokenizer),
        )

    # ------------------------------------------------------------------ run
    def run(self) -> Dict[str, Any]:
        """Train every phase; returns the summary. Raises `StopRequested` after a stop request's checkpoint,
        `UnhealthyStop` when health stops the run (health.py) and `Aborted` after a second Ctrl-C (nothing saved).
        train.log gets the stop reason or the final line."""
        try:
            with warnings_to_log(self.logger):
                verified = self.resume.verify_latest()  # collective: the banner names the checkpoint used
                if self.logger.enabled:
                    device, pc = self.model.device, self.model.pc
                    self.logger.message(banner(self.phases, self.model_config, device, pc, self.work_dir, verified))
                ending = self._attempt(rollback_to=None)
                while ending is not None and ending.rollback_to is not None:  # health.rollback: start again there
                    self.metrics.drop_pending()
                    self.logger.close_bar()
                    self.model.close_optimizer()  # rebuilt and loaded from the rollback's checkpoint
                    ending = self._attempt(rollback_to=ending.rollback_to)
                self.profiler.finish()
                if ending is not None:
                    self.checkpointer.finish_saves()  # the stop's checkpoint counts only once complete
                    self.logger.message(str(ending.error))
                    raise ending.error
                self.logger.message(final_line(self._summary()))
                return self._summary()
        except KeyboardInterrupt:
            # a second Ctrl-C (or one before the handlers were installed): no save, no waiting for a background
            # save either (an unfinished checkpoint never counts)
            self.logger.close_bar()
            last = self.checkpointer.last_complete
            where = f"the last checkpoint, {last}" if last else "the last complete checkpoint"
            reason = (
                f"aborted by Ctrl-C during step {self.progress.step + 1}: nothing saved; a rerun resumes from {where}"
            )
            self.logger.message(reason)
            raise Aborted(reason) from None
        except (StopRequested, UnhealthyStop):
            raise
        except Exception as exc:
            self.logger.log_only(f"error: {type(exc).__name__}: {exc}")
            raise
        finally:
            self.checkpointer.abandon_saves()  # a save still in flight after an abort or a crash: stop its thread
            self.logger.close()

    def _attempt(self, rollback_to: Optional[str]) -> Optional[Ending]:
        """Start (from ``rollback_to`` on a rollback) and train the phases left; None when they all completed."""
        self.watch.idle()  # loading a checkpoint is not a step: no hang limit until the next step starts
        start = self.resume.decide(rollback_to)
        if start.unhealthy:
            return Ending(error=UnhealthyStop(start.unhealthy))
        # the layout of the phase that runs next (of the last phase when all are complete)
        point = start.point
        self.model.enter(self.phases[min(point.phase_index, len(self.phases) - 1)], init=start.random_init)
        restored = self.resume.restore(start, self.model, rollback_to)
        self.progress = restored.progress
        if point.phase_index >= len(self.phases):
            self.logger.message(
                f"all {len(self.phases)} phase(s) are complete (step {self.progress.step}); nothing to do. "
                f"Add a phase config to the command to extend pretraining."
            )
            return None
        restore_from = start.plan.optimizer_from  # where the optimizer state comes from; None: fresh / in memory
        loader_state = restored.loader_state
        for phase in self.phases[point.phase_index :]:
            resuming_inside = phase.index == point.phase_index and point.phase_step > 0
            if self.model.enter(phase, init=False):  # a new layout between phases: from the last phase's checkpoint
                restore_from = self.checkpointer.phase_end_checkpoint(phase, self.progress.step)
                self.checkpointer.load_model(restore_from, self.model)
            self._prepare_optimizer(phase, restore_from, resuming_inside)
            loader = build_train_loader(
                phase.config.data,
                phase.config.seed,
                self.model.pc.dp_rank,
                self.model.pc.dp_size,
                vocab_size=phase.config.model_config.vocab_size,
            )
            if loader_state is not None and (resuming_inside or not phase.config.phase.reset_data):
                loader.load_state_dict(loader_state)  # DataChanged (exit 2) when the data changed under the cursors
            if not resuming_inside:
                record = dict(
                    name=phase.name,
                    file=phase.config_file,
                    steps=phase.steps,
                    fingerprint=phase.fingerprint,
                    first_step=self.progress.step + 1,
                    tokens=0,
                )
                self.progress.history.append(record)
            ending = self._run_phase(phase, point.phase_step if resuming_inside else 0, loader)
            if ending is not None:
                return ending
            loader_state = loader.state_dict()
            restore_from = None  # later phases continue from memory
        decision = self._health(at_end=True)  # the last steps skipped on non-finite values: stop (or roll back)
        if not decision.proceed:
            return Ending.of(decision)
        self.checkpointer.finish_saves()
        return None

    def _prepare_optimizer(self, phase: Phase, checkpoint: Optional[str], resuming_inside: bool) -> None:
        """Optimizer state carries over between phases unless the phase sets phase.reset_optimizer: in memory
        (``checkpoint`` None), or from ``checkpoint`` when resuming or after a layout change."""
        reset = phase.config.phase.reset_optimizer and not resuming_inside
        if self.model.optimizer is not None and not reset:
            return
        self.model.new_optimizer(phase)
        if checkpoint is not None and not reset:
            self.checkpointer.load_optimizer(checkpoint, self.model)
        if reset:
            self.logger.message(f"phase {phase.name!r}: fresh optimizer state (phase.reset_optimizer)")

    # ------------------------------------------------------------------ one phase
    def _run_phase(self, phase: Phase, start: int, loader: Any) -> Optional[Ending]:
        """The steps of one phase. A step issues no host sync of its own: its loss, grad norm and skip flag stay
        device tensors until the next logging step (every ``monitor.log_every`` steps and the phase's last),
        where one read-back turns them into every pending step's metrics line and agrees on a stop request.
        Metrics are also flushed before a validation or a checkpoint: metrics.jsonl covers the checkpointed steps."""
        config, pc = phase.config, self.model.pc
        schedule = build_step_schedule(config, pc)
        valid_batches = build_valid_batches(
            config.data, config.seed, pc.dp_rank, pc.dp_size, vocab_size=config.model_config.vocab_size
        )
        before = self.progress.step - start  # global steps before this phase's first
        self.logger.message(
            f"phase {phase.index + 1}/{len(self.phases)} {phase.name!r}: steps {start + 1}..{phase.steps} (global "
            f"{self.progress.step + 1}..{before + phase.steps}), seq_len {config.data.seq_len}, "
            f"{phase.tokens_per_step:,} tokens/step, data {config.data.train_folder}"
        )
        # skipped steps so far: read once here (the optimizer may keep the count on the device)
        self.metrics.begin_phase(phase, self.phases[phase.index + 1 :], before, int(self.model.optimizer.skipped_steps))
        if self.progress.step == 0:  # a run from scratch: evaluation.at_start
            self._evaluate(schedule, phase, 0, False)
        for phase_step in range(start, phase.steps):
            self.watch.step_started(self.progress.step + 1)  # the hang watchdog's limit starts again
            batch = loader.next_global_batch()
            for line in loader.pop_messages():  # resume notes, streaming throughput, waits for data
                self.logger.message(line)
            if self.health.skips(self.progress.step + 1):  # data.skip_batches: the batch is drawn and dropped
                self._skip_batch(phase)
            else:
                self._train_step(phase, phase_step, batch, schedule, loader)
            step, last = self.progress.step, phase_step + 1 == phase.steps
            if (phase_step + 1) % config.monitor.log_every == 0 or last:
                stop, decision = self._flush(phase, agree_stop=True)  # metrics and the stop agreement: one sync
            else:
                stop, decision = self.stops.due(step), CONTINUE  # the step a stop file named, agreed on earlier
            validate = bool(valid_batches) and (
                last or bool(config.data.valid_every) and step % config.data.valid_every == 0
            )
            save = last or config.ckpt.enable_save_ckpt and step % config.ckpt.checkpoint_every == 0
            if decision.proceed and not last and (stop or validate or save):
                decision = self._flush(phase)[1]  # the steps before a stop, validation or save (no-op after a log)
            if not decision.proceed:
                return Ending.of(decision)
            if stop and not last:
                self.checkpointer.save(self.model, phase, phase_step + 1, False, self.progress, loader, self.health)
                return self._stopped(phase)
            if validate:
                self._validate(schedule, valid_batches)
                self.metrics.restart_window()
            self._evaluate(schedule, phase, step, last)
            if save:
                self.checkpointer.save(self.model, phase, phase_step + 1, last, self.progress, loader, self.health)
                self.metrics.restart_window()
            if stop and phase.index + 1 < len(self.phases):  # at the run's last step a stop changes nothing
                return self._stopped(phase)  # at a phase end: the next phase starts from this checkpoint on rerun
        self.watch.idle()  # a phase's end (a layout change loads a checkpoint, the last save completes) is no step
        self.logger.close_bar()
        return None

    def _train_step(
        self, phase: Phase, phase_step: int, batch: List[Dict[str, Any]], schedule: Any, loader: Any
    ) -> None:
        """Train global step ``progress.step + 1`` on ``batch``; its metrics line waits, device tensors, in
        ``metrics.pending`` for the next flush."""
        config, progress = phase.config, self.progress
        lr, beta2 = config.lr_scheduler, config.beta2_scheduler
        step_lr = warmup_cosine_lr(
            phase_step, phase.lr_total_steps, config.adam.lr, lr.warmup_ratio, lr.eta_min, lr.init_steps
        )
        step_beta2 = beta2_at(progress.step + 1, beta2.init_beta2, beta2.c)
        self.profiler.before_step(progress.step + 1)
        with self.profiler.step_range(progress.step + 1):
            loss, step_result = self.runner.train_step(
                self.model, schedule, batch, step_lr, step_beta2, loader.last_batch_label_tokens, step=progress.step + 1
            )
        grad_norm, skipped = step_result  # a StepResult: also .overflow / .nonfinite / .loss_scale (fp16)
        progress.step += 1
        self.profiler.after_step(progress.step)
        progress.tokens += phase.tokens_per_step
        progress.history[-1]["tokens"] += phase.tokens_per_step
        line = dict(
            step=progress.step,
            phase=phase.name,
            phase_index=phase.index + 1,
            phase_step=phase_step + 1,
            loss=loss,  # device tensors until the flush
            lr=step_lr,
            beta2=step_beta2,
            grad_norm=grad_norm,
            skipped=skipped,
            skipped_steps=None,
            tokens=progress.tokens,
            phase_tokens=progress.history[-1]["tokens"],
            seq_len=config.data.seq_len,
            tgs=None,  # this and the next three: from the host time between flushes
            tflops=None,
            mfu=None,
            step_time=None,
            source_tokens=loader.last_batch_source_tokens,
            **fp16_metrics(step_result, self.model.optimizer),
        )
        self.metrics.add(line, self.model.optimizer)

    def _skip_batch(self, phase: Phase) -> None:
        """A step of data.skip_batches (or one a rollback skips): its batch was drawn and is dropped; no forward,
        no update, no metrics line. The step counts, as InternLM's batch count does: the later step numbers, data
        and learning rates (functions of the step) are those of a run that trained on it."""
        self.progress.step += 1
        self.progress.tokens += phase.tokens_per_step
        self.progress.history[-1]["tokens"] += phase.tokens_per_step
        self.logger.message(
            f"step {self.progress.step}: batch skipped, not trained on (data.skip_batches '{self.health.skip}')"
        )

    def _flush(self, phase: Phase, agree_stop: bool = False) -> Tuple[bool, HealthDecision]:
        """Write the pending steps' metrics (``agree_stop``: with the stop request agreed over the world, a
        collective); returns whether to stop and the health decision on the steps read back."""
        pc, step = self.model.pc, self.progress.step
        flags = self.stops.flags(phase, step, self.model.device, pc.world_size) if agree_stop else None
        read = self.metrics.flush(phase, pc.world_size, self.health, flags)
        if read is None:  # nothing was pending
            return False, CONTINUE
        stop = self.stops.decide(read[0], read[1], step) if agree_stop else False
        if agree_stop:
            self.watch.logging_step(step, self.logger)  # the ranks' step times compared (stragglers.py)
        return stop, self._health()

    def _health(self, at_end: bool = False) -> HealthDecision:
        """The health decision after a flush (or ``at_end`` of training)."""
        if self.health.acting(at_end):  # it reads and marks checkpoints: a background save completes first
            self.checkpointer.finish_saves()
        decision = self.health.review(at_end)
        self.watch.health(decision, self.progress.step)  # an alert unless it continues
        return decision

    def _validate(self, schedule: Any, valid_batches: List[Dict[str, Any]]) -> None:
        self.last_val_loss = self.runner.validate(self.model, schedule, valid_batches)
        self.logger.log(dict(step=self.progress.step, val_loss=self.last_val_loss))
        self.logger.message(f"step {self.progress.step}: validation loss {self.last_val_loss:.4f}")

    def _evaluate(self, schedule: Any, phase: Phase, step: int, last: bool) -> None:
        if self.evaluator is not None and self.evaluator.due(step, last):
            self.evaluator.run(self.model, self.runner, schedule, phase.config.data, step)
            self.metrics.restart_window()

    def _stopped(self, phase: Phase) -> Ending:
        """End the run after a stop request (its checkpoint is saved)."""
        reason = self.stops.reason(phase, self.progress.step)
        self.logger.close_bar()
        return Ending(error=StopRequested(reason))

    def _summary(self) -> Dict[str, Any]:
        progress = self.progress
        return dict(
            step=progress.step, tokens=progress.tokens, loss=self.metrics.last_loss, val_loss=self.last_val_loss
        )
