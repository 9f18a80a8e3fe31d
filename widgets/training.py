"""TrainingDashboard: Run / Pause / Step a `unitok.training.tokenizer_trainer.Trainer` from Jupyter and watch it learn.

    >>> trainer = Trainer.from_preset("tiny", data="shapes", overrides=["eval_images=256", "log_every=10"])
    >>> dash = TrainingDashboard(trainer)
    >>> dash                      # Run trains in a background thread: the kernel stays free to inspect the model
    >>> dash.train(20)            # or block until 20 steps are done (tests, smoke runs)
    >>> dash.timings["redraws"]   # how many times the figure was redrawn (throttled, see below)

Interrupting a blocking `train(n)` (Kernel > Interrupt, or the stop button) prints one line, "stopped at step N;
the model keeps its weights", instead of a traceback: the trainer is left at the last finished step and can go on.
While the dashboard trains, it holds the model's lock (`_common.model_lock`) around every step, so other views
that switch the same model to eval mode take turns with the training steps instead of racing them.

What it reads: `trainer.history` (one metrics dict per step), the "eval" callback's results (and
`trainer.eval_history` for evaluations made before the dashboard existed), `trainer.model_config` and
`trainer.config`. What it calls: `trainer.step()`, `trainer.evaluate()`, `trainer.save_checkpoint()`.

Cost: the step callback only checks a clock; figures are redrawn at most once per `redraw_every_s`, all traces in
one `batch_update()` message, with long curves thinned to `max_points`. The time spent in that code and the time
spent in `trainer.step()` are both measured, and their ratio is `ui_overhead()`.

This file is the wiring (buttons, the worker thread, the trainer's callbacks, what is redrawn when); how the panels
look, live (plotly) and static (matplotlib), is `unitok_widgets.training_figures`.
"""
from __future__ import annotations

import math
import threading
import time
import traceback
from typing import Optional

import numpy as np

import ipywidgets as W

from unitok.training.trainer import TrainingInterrupted

from ._common import hbox, json_safe, model_lock, title_html, View
from .lab import stopped_message
from .training_figures import (LOSS_LABELS, LOSS_TERMS, UNDERSTANDING_LABELS, UNDERSTANDING_TRACES,
                               build_training_figure, static_training_figure, thin)

__all__ = ["TrainingDashboard", "LOSS_TERMS", "LOSS_LABELS", "UNDERSTANDING_TRACES", "UNDERSTANDING_LABELS"]


class TrainingDashboard(View):
    """Live training curves and codebook health for a Trainer, with Run / Pause / Step / Evaluate buttons.

    Args:
        trainer: a `unitok.training.tokenizer_trainer.Trainer` (anything with `step()`, `history`, `add_callback`,
            `model_config`, `config`, `step_count` works).
        redraw_every_s: at most one redraw per this many seconds while training.
        steps: initial value of the steps box (how many steps Run performs).
        max_points: curves longer than this are thinned for display (the history itself is untouched).
        follow_schedule: like `trainer.run`, evaluate every `config.eval_every` steps and checkpoint every
            `config.checkpoint_every` steps (checkpoints only when the trainer has an out_dir). Its evaluations
            use every `eval_images` (not `run`'s smaller interim ones): each point a notebook shows is a full one.

    Widgets tests and notebooks can drive: `run_button`, `pause_button`, `step_button`, `eval_button` (`.click()`),
    `steps` (IntText), `figure` (plotly FigureWidget: `loss_traces`, `psnr_trace`, `eval_trace`, `lr_trace`,
    `dead_traces`, `usage_heatmap`), `status` (HTML), `output` (Output: errors). Methods: `start(steps)`, `pause()`,
    `wait()`, `train(n)`, `evaluate()`, `refresh()`, `ui_overhead()`, `timings`, `detach()`, `close()`,
    `static_figure()`.
    """

    def __init__(self, trainer, *, steps: int = 100, redraw_every_s: float = 1.0, max_points: int = 2000,
                 follow_schedule: bool = True):
        self.trainer = trainer
        self.redraw_every_s = float(redraw_every_s)
        self.max_points = int(max_points)
        self.follow_schedule = follow_schedule
        self.num_codebooks = int(trainer.model_config.num_codebooks)
        self.codebook_size = int(trainer.model_config.codebook_size)

        # Columns ingested from trainer.history (appended incrementally: a redraw never rescans the history).
        self._cols: dict[str, list] = {name: [] for name in ("step", "lr", "psnr_batch", *LOSS_TERMS)}
        self._log_steps: list[int] = []           # steps that carry codebook window statistics
        self._sampled: Optional[dict] = None      # codebook statistics sampled after a Step/Run (not in history)
        self._usage: list[list[float]] = []       # per logged step: k usage fractions
        self._dead: list[list[int]] = []          # per logged step: k dead-code counts
        self._window_tokens: Optional[int] = None
        self._history_ref = None
        self._ingested = 0
        self._evals: list[dict] = [dict(r) for r in getattr(trainer, "eval_history", []) or []]

        # Threading: one worker at most; Pause sets an Event the worker checks between steps.
        self.thread: Optional[threading.Thread] = None
        self._thread_lock = threading.Lock()
        self._redraw_lock = threading.RLock()
        self._pause = threading.Event()
        self._in_loop = False
        self._state = "idle"
        self.last_error: Optional[BaseException] = None

        # Measured costs (seconds): UI = our callbacks + redraws; steps = inside trainer.step().
        self._ui_seconds = 0.0
        self._step_seconds = 0.0
        self._steps_timed = 0
        self._redraws = 0
        self._last_redraw = -math.inf
        self._drawn_rows = -1
        self._dirty = True

        self.model_lock = model_lock(trainer.model) if hasattr(trainer, "model") else threading.RLock()
        self._build_widgets(steps)
        self._replace_previous_dashboards()
        self._callbacks = (self._on_step, self._on_eval)
        trainer.add_callback("step", self._on_step)
        trainer.add_callback("eval", self._on_eval)
        self.refresh()

    def _replace_previous_dashboards(self) -> None:
        """One dashboard per trainer: re-running a notebook cell must not leave an old dashboard redrawing on every
        step (double the cost) or training in a second thread. Older ones are paused and detached."""
        callbacks = getattr(self.trainer, "callbacks", None)
        if not isinstance(callbacks, dict):
            return
        old = {fn.__self__ for fns in callbacks.values() for fn in fns
               if isinstance(getattr(fn, "__self__", None), TrainingDashboard)}
        for dashboard in old:
            dashboard.detach()
            dashboard.status.value = "<i>replaced by a newer dashboard for this trainer</i>"
            for button in (dashboard.run_button, dashboard.pause_button, dashboard.step_button,
                           dashboard.eval_button):
                button.disabled = True

    # ------------------------------------------------------------------ widgets
    def _build_widgets(self, steps: int) -> None:
        self.run_button = W.Button(description="Run", icon="play", button_style="success",
                                   tooltip="train `steps` steps in a background thread")
        self.pause_button = W.Button(description="Pause", icon="pause", button_style="warning", disabled=True,
                                     tooltip="stop after the current step")
        self.step_button = W.Button(description="Step", icon="step-forward", tooltip="one training step")
        self.eval_button = W.Button(description="Evaluate", icon="check", tooltip="trainer.evaluate() now")
        for b in (self.run_button, self.pause_button, self.step_button, self.eval_button):
            b.layout = W.Layout(width="110px")
        self.steps = W.IntText(value=steps, description="steps", layout=W.Layout(width="170px"),
                               style={"description_width": "40px"})
        self.status = W.HTML()
        self.output = W.Output(layout=W.Layout(max_height="160px", overflow="auto"))
        self.run_button.on_click(lambda _: self.start())
        self.pause_button.on_click(lambda _: self.pause())
        self.step_button.on_click(lambda _: self.start(1))
        self.eval_button.on_click(lambda _: self._start_job(self._evaluate_job))
        self.figure = self._build_figure()
        controls = hbox([self.run_button, self.pause_button, self.step_button, self.steps, self.eval_button], gap=6)
        header = W.HTML(title_html("Training", f"{self.num_codebooks} sub-codebooks × {self.codebook_size} codes; "
                                               f"figures refresh at most every {self.redraw_every_s:g} s"))
        self.widget = self._root([header, controls, self.status, self.figure, self.output])

    def _usage_title(self) -> str:
        """Why the codebook panels move less often than the curves: the trainer measures them every log_every steps
        (a host sync), and the dashboard adds one sample when a Step or Run ends."""
        every = getattr(getattr(self.trainer, "config", None), "log_every", None)
        window = f"over the last {self._window_tokens:,} training tokens" if self._window_tokens else \
            "over the recent-token window"
        when = f"measured every {every} steps and after each Step/Run" if every else "measured after each Step/Run"
        return f"codes used per sub-codebook (share of K = {self.codebook_size}, {window})<br>{when}"

    def _build_figure(self):
        """The plotly FigureWidget (`unitok_widgets.training_figures`), its traces kept by role for the redraws."""
        fw, traces = build_training_figure(self.num_codebooks, self._usage_title())
        self.loss_traces, self.understanding_traces = traces["loss_traces"], traces["understanding_traces"]
        self.psnr_trace, self.eval_trace, self.lr_trace = traces["psnr_trace"], traces["eval_trace"], traces["lr_trace"]
        self.dead_traces, self.usage_heatmap = traces["dead_traces"], traces["usage_heatmap"]
        self._marked = traces["marked"]
        return fw

    # ------------------------------------------------------------------ trainer callbacks (cheap)
    def _on_step(self, trainer, metrics: dict) -> None:
        t0 = time.perf_counter()
        if not self._in_loop:           # a step we did not time ourselves (e.g. the user called trainer.run)
            self._step_seconds += float(metrics.get("seconds", 0.0))
            self._steps_timed += 1
        self._dirty = True
        if time.perf_counter() - self._last_redraw >= self.redraw_every_s:
            self._redraw()
        self._ui_seconds += time.perf_counter() - t0

    def _on_eval(self, trainer, results: dict) -> None:
        t0 = time.perf_counter()
        self._evals.append({"step": results.get("step", trainer.step_count), **results})
        self._dirty = True
        self._redraw()                  # evaluations are rare and slow: show their point at once
        self._ui_seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ data
    def _ingest(self) -> None:
        history = self.trainer.history
        if history is not self._history_ref or len(history) < self._ingested:   # replaced, e.g. load_checkpoint
            for col in self._cols.values():
                col.clear()
            for series in (self._log_steps, self._usage, self._dead):
                series.clear()
            self._history_ref, self._ingested = history, 0
            self._evals = [dict(r) for r in getattr(self.trainer, "eval_history", []) or []]
        end = len(history)                   # the worker may append meanwhile: take a fixed slice
        for m in history[self._ingested:end]:
            for name, col in self._cols.items():
                col.append(m.get(name, math.nan))
            if "codebook_usage" in m:
                self._log_steps.append(m["step"])
                self._usage.append(list(m["codebook_usage"]))
                self._dead.append(list(m.get("dead_codes", [math.nan] * self.num_codebooks)))
                self._window_tokens = m.get("codebook_window_tokens", self._window_tokens)
        self._ingested = end
        s = self._sampled
        if s is not None and (not self._log_steps or s["step"] > self._log_steps[-1]):
            self._log_steps.append(s["step"])
            self._usage.append(list(s["codebook_usage"]))
            self._dead.append(list(s["dead_codes"]))
            self._window_tokens = s.get("codebook_window_tokens", self._window_tokens)
            self._sampled = None

    def _sample_codebooks(self) -> None:
        """After a Step or Run: measure the codebook window once more unless the last step already logged it, so
        the codebook panels follow a single Step instead of waiting for the next `log_every` step."""
        history = self.trainer.history
        measure = getattr(self.trainer, "codebook_window_stats", None)
        if not history or "codebook_usage" in history[-1] or measure is None:
            return
        with self.model_lock:
            stats = measure()
        self._sampled = {"step": history[-1]["step"], **stats}
        self._dirty = True

    # ------------------------------------------------------------------ drawing
    def refresh(self) -> None:
        """Redraw now (whatever the throttle says)."""
        t0 = time.perf_counter()
        self._redraw()
        self._ui_seconds += time.perf_counter() - t0

    def _redraw(self) -> None:
        with self._redraw_lock:
            self._last_redraw = time.perf_counter()
            self._ingest()
            rows = len(self._cols["step"])
            if rows != self._drawn_rows or self._dirty:
                self._draw_figure()
                self._drawn_rows = rows
                self._dirty = False
                self._redraws += 1
            self._draw_status()

    def _draw_figure(self) -> None:
        keep = thin(len(self._cols["step"]), self.max_points)
        steps = np.asarray(self._cols["step"], dtype=np.int64)[keep]
        col = {name: np.asarray(values, dtype=np.float64)[keep] for name, values in self._cols.items()}
        log_keep = thin(len(self._log_steps), max(50, self.max_points // 5))
        log_steps = np.asarray(self._log_steps, dtype=np.int64)[log_keep]
        usage = np.asarray(self._usage, dtype=np.float64).reshape(-1, self.num_codebooks)[log_keep].T  # (k, L)
        dead = np.asarray(self._dead, dtype=np.float64).reshape(-1, self.num_codebooks)[log_keep].T
        evals = [(r["step"], r["psnr"]) for r in self._evals if "psnr" in r]
        mode = "lines+markers" if len(steps) <= 60 else "lines"
        with self.figure.batch_update():
            for trace in self._marked:
                trace.mode = mode
            for name, trace in self.loss_traces.items():
                trace.x, trace.y = steps, json_safe(col[name])
            self.psnr_trace.x, self.psnr_trace.y = steps, json_safe(col["psnr_batch"])
            self.eval_trace.x = [s for s, _ in evals]
            self.eval_trace.y = json_safe([p for _, p in evals])
            peak = getattr(getattr(self.trainer, "config", None), "lr", None) or max(col["lr"], default=1.0) or 1.0
            self.lr_trace.x, self.lr_trace.y = steps, json_safe([100 * v / peak for v in col["lr"]])
            for name, trace in self.understanding_traces.items():
                points = [(r["step"], 100 * r[name]) for r in self._evals if r.get(name) is not None]
                trace.x, trace.y = [s for s, _ in points], json_safe([v for _, v in points])
            for i, trace in enumerate(self.dead_traces):
                trace.x, trace.y = log_steps, json_safe(dead[i]) if dead.size else []
            self.usage_heatmap.x = log_steps
            self.usage_heatmap.z = json_safe(usage) if usage.size else [[None]] * self.num_codebooks
            self.figure.layout.annotations[4].text = self._usage_title()

    def _draw_status(self) -> None:
        c = self._cols
        parts = [f"<b>{self._state}</b>", f"step <b>{self.trainer.step_count}</b>"]
        if c["step"]:
            parts += [f"loss {c['loss'][-1]:.4f}", f"batch PSNR {c['psnr_batch'][-1]:.2f} dB", f"lr {c['lr'][-1]:.2e}"]
        if self._steps_timed and self._step_seconds > 0:
            parts.append(f"{self._steps_timed / self._step_seconds:.2f} steps/s")
        if self._evals:
            last = self._evals[-1]
            text = f"eval @ {last.get('step')}: PSNR {last.get('psnr', math.nan):.2f} dB"
            if "zero_shot_top1" in last:
                text += f", zero-shot top-1 {100 * last['zero_shot_top1']:.1f} %"
            if "linear_probe_top1" in last:
                text += f", linear probe {100 * last['linear_probe_top1']:.1f} %"
            parts.append(text)
        parts.append(f"UI overhead {100 * self.ui_overhead():.1f} %")
        colour = {"running": "#2a7", "pausing": "#c80", "error": "#c33"}.get(self._state, "#555")
        self.status.value = (f"<div style='font-size:13px;color:{colour}'>" + " · ".join(parts[:1]) +
                             "<span style='color:#333'> · " + " · ".join(parts[1:]) + "</span></div>")

    # ------------------------------------------------------------------ training
    @property
    def running(self) -> bool:
        """True while a background worker (Run / Step / Evaluate) is alive."""
        return self.thread is not None and self.thread.is_alive()

    def start(self, steps: Optional[int] = None) -> bool:
        """Train `steps` more steps (default: the steps box) in a background thread. False if already running."""
        n = int(self.steps.value if steps is None else steps)
        return self._start_job(lambda: self._train_steps(n))

    def _start_job(self, job) -> bool:
        with self._thread_lock:
            if self.running:
                return False            # never two workers at once
            self._pause.clear()
            self._set_state("running")
            self.thread = threading.Thread(target=self._worker, args=(job,), name="unitok-dashboard", daemon=True)
            self.thread.start()
        return True

    def _worker(self, job) -> None:
        try:
            job()
        except Exception as error:      # shown, never raised into a thread nobody joins
            self._report(error)
        finally:
            self._finish()

    def pause(self) -> None:
        """Ask the worker to stop after the current step (returns at once; `wait()` to join)."""
        if self.running:
            self._pause.set()
            self._set_state("pausing")

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Join the worker; True when it has finished."""
        thread = self.thread
        if thread is not None:
            thread.join(timeout)
        return not self.running

    def train(self, steps: int) -> list:
        """Train `steps` steps in this thread (blocking), with the same throttled redraws as Run; a final redraw
        shows the last step. Errors are shown in `output` and raised. Returns the trainer's history.

        If Run / Step is still training in the background (a student pressed Run, then ran this cell), this first
        waits for that to finish, saying so, then trains its own `steps`: buttons and cells can be used in any
        order. An interrupt while waiting pauses the background run with the same one-line message."""
        if self.running:
            print("the dashboard is still training in the background (Run or Step); waiting for it to finish")
            try:
                self.wait()
            except KeyboardInterrupt:
                self.pause()
                self.wait()
                raise TrainingInterrupted(stopped_message([self.trainer])) from None
        with self._thread_lock:
            if self.running:            # pressed again in the meantime: never two workers on one trainer
                raise RuntimeError("the dashboard is already training in the background; pause() and wait() first")
            self._pause.clear()
            self._set_state("running")
        try:
            self._train_steps(int(steps))
        except KeyboardInterrupt:
            # Kernel > Interrupt: one line, not a screen of traceback. The interrupted step either finished (it is
            # in the history) or never reached the optimiser; either way the weights are those of a whole step.
            self._pause.set()
            raise TrainingInterrupted(stopped_message([self.trainer])) from None
        except Exception as error:
            self._report(error)
            raise
        finally:
            self._finish()
        return self.trainer.history

    def evaluate(self) -> dict:
        """trainer.evaluate() now (blocking); the eval callback adds the point to the PSNR plot."""
        with self.model_lock:
            return self.trainer.evaluate()

    def _evaluate_job(self) -> None:
        self._set_state("evaluating")
        with self.model_lock:
            self.trainer.evaluate()

    def _train_steps(self, n: int) -> None:
        trainer = self.trainer
        self._in_loop = True
        try:
            for _ in range(n):
                if self._pause.is_set():
                    break
                t0, ui0 = time.perf_counter(), self._ui_seconds
                with self.model_lock:       # views using the same model wait for the end of this step
                    trainer.step()
                # time inside trainer.step, minus what our own step callback spent redrawing inside it
                self._step_seconds += time.perf_counter() - t0 - (self._ui_seconds - ui0)
                self._steps_timed += 1
                if self.follow_schedule:  # the same schedule as trainer.run()
                    if trainer.eval_due():
                        self._set_state("evaluating")
                        with self.model_lock:
                            trainer.evaluate()
                        self._set_state("running")
                    if trainer.checkpoint_due():
                        with self.model_lock:
                            trainer.save_checkpoint()
        finally:
            self._in_loop = False

    def _set_state(self, state: str) -> None:
        self._state = state
        running = state in ("running", "pausing", "evaluating")
        self.run_button.disabled = self.step_button.disabled = self.eval_button.disabled = running
        self.pause_button.disabled = state != "running"

    def _finish(self) -> None:
        try:
            self._sample_codebooks()
        except Exception as error:       # a statistics failure must not hide the training result
            self._report(error)
        if self._state != "error":
            self._set_state("paused" if self._pause.is_set() else "idle")
        else:
            self.run_button.disabled = self.step_button.disabled = self.eval_button.disabled = False
            self.pause_button.disabled = True
        t0 = time.perf_counter()
        self._redraw()                  # the last steps may have fallen inside the throttle interval
        self._ui_seconds += time.perf_counter() - t0

    def _report(self, error: BaseException) -> None:
        self.last_error = error
        self._state = "error"
        # append_stderr works from any thread (a `with output:` block would not capture a worker's prints)
        self.output.append_stderr("".join(traceback.format_exception(type(error), error, error.__traceback__)))

    # ------------------------------------------------------------------ costs
    def ui_overhead(self) -> float:
        """Measured fraction: seconds spent in the dashboard's callbacks and redraws / seconds in trainer.step()."""
        return self._ui_seconds / self._step_seconds if self._step_seconds > 0 else 0.0

    @property
    def timings(self) -> dict:
        return {"ui_seconds": self._ui_seconds, "step_seconds": self._step_seconds, "steps": self._steps_timed,
                "redraws": self._redraws, "ui_overhead": self.ui_overhead()}

    def detach(self) -> None:
        """Stop training (after the current step) and stop listening to the trainer's callbacks."""
        self.pause()
        self.wait()
        for event, fn in zip(("step", "eval"), self._callbacks):
            self.trainer.remove_callback(event, fn)

    def close(self) -> None:
        """`detach()` (stop training after the current step, stop listening) and close every widget."""
        self.detach()
        super().close()

    # ------------------------------------------------------------------ static picture
    def static_figure(self):
        """The same panels as a matplotlib Figure (for notebooks rendered without a kernel)."""
        with self._redraw_lock:
            self._ingest()
            c = {name: np.asarray(v, dtype=np.float64) for name, v in self._cols.items()}
            log_steps = np.asarray(self._log_steps)
            usage = np.asarray(self._usage, dtype=np.float64).reshape(-1, self.num_codebooks).T
            dead = np.asarray(self._dead, dtype=np.float64).reshape(-1, self.num_codebooks).T
            evals = [(r["step"], r["psnr"]) for r in self._evals if "psnr" in r]
            understanding = {name: [(r["step"], 100 * r[name]) for r in self._evals if r.get(name) is not None]
                             for name, _, _ in UNDERSTANDING_TRACES}
        return static_training_figure(c, log_steps, usage, dead, evals, understanding,
                                      num_codebooks=self.num_codebooks, codebook_size=self.codebook_size,
                                      window_tokens=self._window_tokens, step_count=self.trainer.step_count)
