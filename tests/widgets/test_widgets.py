"""Tests for unitok_widgets: every view driven from Python (buttons clicked, sliders moved, dropdowns changed) on a
tiny random-weight model. CPU, deterministic, no wall-clock assertions (redraws are counted, not timed); about half
a minute for the whole file."""
import dataclasses
import inspect
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import unitok  # noqa: F401  (first: makes torchvision importable on CPU-only torch)

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")
pytest.importorskip("anywidget")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402
from plotly.callbacks import Points  # noqa: E402

import unitok_widgets as UW  # noqa: E402
from unitok import UniTok, get_preset  # noqa: E402
from unitok.evaluation import codebook_stats
from unitok.evaluation import image_metrics
from unitok.evaluation import zero_shot  # noqa: E402
from unitok.training.trainer import TrainingInterrupted  # noqa: E402
from unitok.data.shapes_dataset import ShapesDataset  # noqa: E402
from unitok.training.tokenizer_trainer import Trainer  # noqa: E402
from unitok_widgets import embeddings as embeddings_module  # noqa: E402

# Small enough that a training step takes tens of milliseconds; k = 4 sub-codebooks of K = 64 codes, 8 x 8 tokens.
SHRINK = dict(width=64, encoder_depth=1, decoder_depth=1, num_heads=2, latent_dim=16, num_codebooks=4,
              codebook_size=64, text_width=32, text_layers=1, text_heads=2, context_length=16)
K, k, G = 64, 4, 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UniTok(dataclasses.replace(get_preset("tiny").model, **SHRINK)).eval()


@pytest.fixture(scope="module")
def other_model():
    torch.manual_seed(1)
    return UniTok(dataclasses.replace(get_preset("tiny").model, **SHRINK)).eval()


@pytest.fixture(scope="module")
def dataset():
    return ShapesDataset(32, split="test", length=48, max_objects=1)


@pytest.fixture(scope="module")
def images(dataset):
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


@pytest.fixture(scope="module")
def trainer():
    overrides = [f"{key}={value}" for key, value in SHRINK.items()]
    overrides += ["batch_size=8", "eval_images=16", "log_every=2", "eval_every=0", "checkpoint_every=0"]
    return Trainer.from_preset("tiny", data="shapes", overrides=overrides)


def assert_figure(fig):
    assert isinstance(fig, Figure) and fig.axes


def click(trace, xs=(), ys=(), inds=()):
    """What plotly's FigureWidget passes to an on_click callback."""
    return Points(point_inds=list(inds), xs=list(xs), ys=list(ys), trace_name=trace.name, trace_index=0)


# ---------------------------------------------------------------------------------------------------------------
# TrainingDashboard
# ---------------------------------------------------------------------------------------------------------------

def test_dashboard_train_draws_every_curve(trainer):
    dash = UW.TrainingDashboard(trainer)
    try:
        start = trainer.step_count
        dash.train(3)
        assert trainer.step_count == start + 3
        for name, trace in dash.loss_traces.items():
            assert len(trace.x) == len(trace.y) == 3, name
        assert list(dash.loss_traces["loss"].y) == pytest.approx([m["loss"] for m in trainer.history])
        assert list(dash.psnr_trace.y) == pytest.approx([m["psnr_batch"] for m in trainer.history])
        assert len(dash.lr_trace.y) == 3
        logged = [m["step"] for m in trainer.history if "codebook_usage" in m]       # steps 1 and 2 (log_every=2) ...
        logged.append(3)                                 # ... and the sample the dashboard takes when train() ends
        assert np.asarray(dash.usage_heatmap.z).shape == (k, len(logged))
        assert list(dash.usage_heatmap.x) == logged
        assert len(dash.dead_traces) == k and all(len(t.y) == len(logged) for t in dash.dead_traces)
        assert list(dash.dead_traces[0].y)[:2] == [m["dead_codes"][0] for m in trainer.history if "codebook_usage" in m]
        assert all(trace.mode == "lines+markers" for trace in dash.loss_traces.values())   # visible from step 1
        assert "step <b>3</b>" in dash.status.value
        assert_figure(dash.static_figure())
    finally:
        dash.close()


def test_dashboard_run_button_trains_steps_box_count_in_background(trainer):
    dash = UW.TrainingDashboard(trainer)
    try:
        start = trainer.step_count
        dash.steps.value = 2
        dash.run_button.click()
        assert dash.thread is not None
        assert dash.wait(120)
        assert trainer.step_count == start + 2
        assert len(dash.loss_traces["loss"].y) == len(trainer.history)        # the final redraw shows the last step
        assert not dash.run_button.disabled and dash.pause_button.disabled
        dash.step_button.click()                                               # Step = one step, same machinery
        assert dash.wait(120) and trainer.step_count == start + 3
    finally:
        dash.close()


def test_dashboard_pause_stops_the_thread_and_never_runs_two(trainer):
    dash = UW.TrainingDashboard(trainer)
    try:
        start = trainer.step_count
        dash.steps.value = 1000
        assert dash.start()
        assert not dash.start(), "a second worker must not start while one runs"
        deadline = time.time() + 60
        while trainer.step_count == start and time.time() < deadline:
            time.sleep(0.01)
        assert dash.running and not dash.pause_button.disabled
        dash.pause_button.click()
        assert dash.wait(60) and not dash.running
        assert start < trainer.step_count < start + 1000
        assert "paused" in dash.status.value and not dash.run_button.disabled
        before = trainer.step_count
        assert dash.start(3)
        dash.train(1)                              # Run still going: train() waits for it, then does its own step
        assert not dash.running and trainer.step_count == before + 4
        assert dash.start(1000)
        dash.pause()
        assert dash.wait(60)
    finally:
        dash.close()


def test_a_new_dashboard_replaces_the_old_one(trainer):
    old = UW.TrainingDashboard(trainer)
    old.steps.value = 1000
    assert old.start()
    new = UW.TrainingDashboard(trainer)             # e.g. the notebook cell was run again
    try:
        assert not old.running                      # paused and joined: never two workers on one trainer
        assert old._on_step not in trainer.callbacks["step"] and new._on_step in trainer.callbacks["step"]
    finally:
        new.close()


def test_dashboard_eval_callback_adds_psnr_point(trainer):
    dash = UW.TrainingDashboard(trainer)
    try:
        results = trainer.evaluate(max_images=16)
        assert list(dash.eval_trace.x) == [trainer.step_count]
        assert list(dash.eval_trace.y) == pytest.approx([results["psnr"]])
        assert "eval @" in dash.status.value
        # understanding over training: zero-shot (seen, held-out) and the linear probe, in percent, per eval
        for name in ("zero_shot_top1", "zero_shot_top1_heldout", "linear_probe_top1"):
            trace = dash.understanding_traces[name]
            assert list(trace.x) == [trainer.step_count] and list(trace.y) == pytest.approx([100 * results[name]])
        assert "linear probe" in dash.status.value
        assert_figure(dash.static_figure())
    finally:
        dash.close()
    assert dash._on_step not in trainer.callbacks["step"]            # close() detached the dashboard


def test_dashboard_shows_errors_and_stops():
    class Failing:
        """The trainer surface the dashboard uses, failing at the second step."""
        model_config = types.SimpleNamespace(num_codebooks=2, codebook_size=8)
        config = types.SimpleNamespace(eval_every=0, checkpoint_every=0)

        def __init__(self):
            self.history, self.step_count, self.callbacks = [], 0, {"step": [], "eval": []}

        def add_callback(self, event, fn):
            self.callbacks[event].append(fn)

        def remove_callback(self, event, fn):
            self.callbacks[event].remove(fn)

        def eval_due(self):
            return False

        checkpoint_due = eval_due

        def step(self):
            if self.step_count == 1:
                raise FloatingPointError("loss became nan")
            self.step_count += 1
            m = {"step": 1, "lr": 1e-3, "loss": 1.0, "l1": 0.1, "l2": 0.1, "vq": 0.1, "clip": 0.7,
                 "psnr_batch": 12.0, "seconds": 0.01, "codebook_usage": [0.5, 0.25], "dead_codes": [4, 6],
                 "codebook_window_tokens": 64}
            self.history.append(m)
            for fn in self.callbacks["step"]:
                fn(self, m)
            return m

    fake = Failing()
    dash = UW.TrainingDashboard(fake)
    dash.steps.value = 5
    dash.run_button.click()
    assert dash.wait(30)
    assert fake.step_count == 1 and isinstance(dash.last_error, FloatingPointError)
    assert "loss became nan" in "".join(o.get("text", "") for o in dash.output.outputs)
    assert "error" in dash.status.value and not dash.run_button.disabled
    with pytest.raises(FloatingPointError):
        dash.train(3)


def test_dashboard_redraws_are_throttled_counted_not_timed(trainer):
    """The throttle decides how often the figure is redrawn; count redraws instead of timing them."""
    lazy = UW.TrainingDashboard(trainer, redraw_every_s=3600)       # the clock never allows a redraw mid-run
    try:
        before = lazy.timings["redraws"]
        lazy.train(6)
        assert lazy.timings["redraws"] == before + 1                # only the final redraw that shows the last step
        assert len(lazy.loss_traces["loss"].y) == len(trainer.history)
    finally:
        lazy.close()
    eager = UW.TrainingDashboard(trainer, redraw_every_s=0)          # no throttle: one redraw per step
    try:
        before = eager.timings["redraws"]
        eager.train(6)
        assert eager.timings["redraws"] >= before + 6
    finally:
        eager.close()


def test_dashboard_interrupt_prints_one_line_and_keeps_the_trainer_usable(trainer, capsys, monkeypatch):
    dash = UW.TrainingDashboard(trainer)
    try:
        start, real_step, calls = trainer.step_count, trainer.step, []

        def step_then_interrupt():
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt          # what Kernel > Interrupt raises in the cell's thread
            return real_step()

        monkeypatch.setattr(trainer, "step", step_then_interrupt)
        with pytest.raises(TrainingInterrupted) as stopped:   # an error, so that Run All stops here
            dash.train(10)
        assert stopped.value._render_traceback_() == [   # what Jupyter shows instead of a traceback
            f"■ stopped at step {start + 2}; the model keeps its weights. The cells below were not run: "
            "run this cell again to go on, or run the next cells one by one."]
        assert trainer.step_count == start + 2 and len(trainer.history) == trainer.step_count
        assert not dash.run_button.disabled and not dash.step_button.disabled and dash.pause_button.disabled
        monkeypatch.setattr(trainer, "step", real_step)
        dash.step_button.click()                  # and training goes on from there
        assert dash.wait(120) and trainer.step_count == start + 3
    finally:
        dash.close()


def test_dashboard_step_updates_the_codebook_panels(trainer):
    """log_every=2: an odd step logs no codebook statistics, yet after a Step the panels show that step."""
    dash = UW.TrainingDashboard(trainer)
    try:
        if trainer.step_count % 2 == 1:
            dash.train(1)                         # make the next step odd (not a logging step)
        dash.step_button.click()
        assert dash.wait(120)
        assert "codebook_usage" not in trainer.history[-1]
        assert list(dash.usage_heatmap.x)[-1] == trainer.step_count
        assert list(dash.dead_traces[0].x)[-1] == trainer.step_count
        stats = trainer.codebook_window_stats()
        assert np.asarray(dash.usage_heatmap.z)[:, -1].tolist() == pytest.approx(stats["codebook_usage"])
        assert "after each Step/Run" in dash.figure.layout.annotations[4].text
    finally:
        dash.close()


def test_views_and_the_dashboard_take_turns_on_one_model(images):
    """The dashboard trains in a thread while the main thread runs views on the same model. With dead-code restart
    on, the quantizer counts only training-mode calls: exactly one per training step, none from the views."""
    overrides = [f"{key}={value}" for key, value in SHRINK.items()]
    overrides += ["batch_size=8", "eval_images=16", "log_every=2", "eval_every=0", "checkpoint_every=0",
                  "dead_code_restart_every=100000"]
    shared = Trainer.from_preset("tiny", data="shapes", overrides=overrides)
    dash = UW.TrainingDashboard(shared)
    try:
        assert dash.start(12)
        views = 0
        while dash.running or views < 3:          # keep switching the model to eval from this thread
            UW.TokenGrid(shared.model, images[views % len(images)]).close()
            views += 1
        assert dash.wait(120)
        assert shared.step_count == 12
        assert int(shared.model.quantizer.calls_since_restart) == 12
    finally:
        dash.close()


def test_model_lock_blocks_inference_until_released(model, images):
    from unitok_widgets._common import encode_images, model_lock

    entered, done = threading.Event(), threading.Event()

    def view():
        encode_images(model, images[:2])
        entered.set()

    with model_lock(model):                        # e.g. a training step in progress
        worker = threading.Thread(target=view)
        worker.start()
        assert not entered.wait(0.3)               # the view waits for the step ...
    worker.join(30)
    assert entered.is_set()                        # ... and runs right after it
    done.set()


# ---------------------------------------------------------------------------------------------------------------
# CodebookUsage
# ---------------------------------------------------------------------------------------------------------------

def test_codebook_usage_from_model_matches_codebook_stats(model, dataset, images):
    view = UW.CodebookUsage(model, dataset)
    codes = model.encode(images)
    expected = codebook_stats.codebook_stats(codes, K)
    assert view.window_tokens == len(dataset) * G * G == expected["window_tokens"]
    assert view.stats["codebook_usage"] == expected["codebook_usage"] and view.stats["dead_codes"] == expected["dead_codes"]
    assert view.stats["perplexity"] == pytest.approx(expected["perplexity"])
    assert f"N = {view.window_tokens:,} tokens" in view.table.value
    assert np.asarray(view.mi_figure.data[0].z).shape == (k, k)
    assert len(view.overview_figure.data) == k + 1                      # k curves + the uniform line
    # the dropdown picks the detail plot's sub-codebook: sorted frequencies of that sub-codebook
    view.codebook.value = 2
    counts = np.bincount(codes[..., 2].flatten().numpy(), minlength=K)
    used = np.sort(counts[counts > 0])[::-1]
    assert np.allclose(view.detail_figure.data[0].y, used / view.window_tokens)
    assert "sub-codebook 2" in view.detail_figure.layout.title.text
    assert view.overview_figure.data[2].line.width > view.overview_figure.data[0].line.width
    assert_figure(view.static_figure())


def test_codebook_usage_from_codes_stats_and_window(model, images):
    codes = model.encode(images)
    with pytest.raises(ValueError, match="codebook_size"):
        UW.CodebookUsage(codes)
    view = UW.CodebookUsage(codes, codebook_size=K, window=100)
    assert view.window_tokens == 100 and view.counts.sum(1).tolist() == [100] * k
    stats_view = UW.CodebookUsage(codebook_stats.codebook_stats(codes, K))
    assert stats_view.counts is None and stats_view.codebook_size == K
    stats_view.codebook.value = 1
    assert_figure(stats_view.static_figure())
    windowed = UW.CodebookUsage(model, images, window=G * G * 3)       # 3 images' worth of tokens
    assert windowed.window_tokens == 192


# ---------------------------------------------------------------------------------------------------------------
# ReconstructionViewer
# ---------------------------------------------------------------------------------------------------------------

def test_reconstruction_viewer_slider_updates_psnr_and_images(model, dataset):
    viewer = UW.ReconstructionViewer(model, dataset)
    first_png = viewer.panels["reconstruction"][1].value
    viewer.index.value = 3
    x = dataset[3]["image"][None]
    with torch.no_grad():
        expected = float(image_metrics.psnr(model.reconstruct(x).clamp(-1, 1), x, reduction="none")[0])
    assert viewer.result["index"] == 3 and viewer.result["psnr"] == pytest.approx(expected, abs=1e-4)
    assert f"{expected:.2f} dB" in viewer.panels["reconstruction"][0].value
    assert viewer.panels["reconstruction"][1].value != first_png
    assert torch.equal(viewer.result["original"], dataset[3]["image"])
    assert viewer.result["error_map"].shape == (32, 32, 3)
    assert viewer.compare.disabled                                     # no other model given
    assert_figure(viewer.static_figure())


def test_reconstruction_viewer_ablation_and_compare(model, other_model, dataset):
    viewer = UW.ReconstructionViewer(model, dataset, other_model=other_model, ablation_images=16)
    assert viewer.panels["ablated"][2].layout.display == "none"
    viewer.index.value = 2
    viewer.ablate.value = 1
    r = viewer.result
    assert r["ablated"] is not None and viewer.panels["ablated"][2].layout.display is None
    assert not torch.equal(r["ablated"], r["reconstruction"])          # replacing one chunk changes pixels
    # most frequent code over the first batch, replacing sub-codebook 1 everywhere
    codes = model.encode(torch.stack([dataset[i]["image"] for i in range(16)]))
    top = int(torch.bincount(codes[..., 1].flatten(), minlength=K).argmax())
    assert int(viewer.most_frequent[1]) == top
    ablated_codes = r["codes"][None].clone()
    ablated_codes[..., 1] = top
    x = dataset[2]["image"][None]
    with torch.no_grad():
        expected = float(image_metrics.psnr(model.decode(ablated_codes).clamp(-1, 1), x, reduction="none")[0])
    assert r["psnr_ablated"] == pytest.approx(expected, abs=1e-4)
    assert f"−{r['psnr'] - r['psnr_ablated']:.2f} dB" in viewer.info.value
    assert f"{r['psnr_ablated']:.2f} dB" in viewer.panels["ablated"][0].value
    viewer.mode.value = "random codes"
    assert not torch.equal(viewer.result["ablated"], r["ablated"])
    viewer.compare.value = True
    with torch.no_grad():
        other = float(image_metrics.psnr(other_model.reconstruct(x).clamp(-1, 1), x, reduction="none")[0])
    assert viewer.result["psnr_other"] == pytest.approx(other, abs=1e-4)
    assert viewer.panels["other"][2].layout.display is None
    viewer.drops_button.click()
    assert len(viewer.drops["drops"]) == k and len(viewer.drops_figure.data[0].y) == k
    assert_figure(viewer.static_figure())


TRAINED = Path(__file__).resolve().parents[2] / "data" / "tiny-shapes"


@pytest.mark.skipif(not (TRAINED / "model.safetensors").exists(), reason="no bundled trained checkpoint")
def test_ablation_lowers_psnr_on_a_trained_model():
    trained = UniTok.from_pretrained(TRAINED).eval()
    data = ShapesDataset(trained.config.image_size, split="test", length=16)
    viewer = UW.ReconstructionViewer(trained, data, ablation_images=16)
    drops = viewer.ablation_drops("random codes")["drops"]
    assert min(drops) > 0, drops


# ---------------------------------------------------------------------------------------------------------------
# TokenEmbeddingExplorer
# ---------------------------------------------------------------------------------------------------------------

def test_embedding_explorer_pca_usage_colours_and_gallery(model, dataset, images):
    explorer = UW.TokenEmbeddingExplorer(model, dataset, num_images=32, method="pca", max_patches=10)
    codes = model.encode(images[:32])
    counts0 = np.bincount(codes[..., 0].flatten().numpy(), minlength=K)
    assert len(explorer.points.x) == K and len(explorer.points.y) == K
    assert list(explorer.points.marker.color) == counts0.tolist()
    vectors = model.quantizer.normalized_codebooks()[0].detach().numpy()
    assert np.allclose(explorer.points.x, embeddings_module.pca_2d(vectors)[:, 0])
    # the explorer starts on the most used code; choose a rarer used one through the code box
    rare = int(np.flatnonzero(counts0 == counts0[counts0 > 0].min())[0])
    explorer.code.value = rare
    assert explorer.gallery_total == counts0[rare] and explorer.gallery_count == min(10, counts0[rare])
    assert len(explorer.gallery_positions) == explorer.gallery_count and explorer.gallery.value
    for b, r, c in explorer.gallery_positions:
        assert int(codes[b, r, c, 0]) == rare
    # clicking a point selects its code
    busiest = int(counts0.argmax())
    explorer._on_click(explorer.points, click(explorer.points, inds=[busiest]), None)
    assert explorer.code.value == busiest and explorer.gallery_count == min(10, counts0[busiest])
    assert list(explorer.highlight.x) == [explorer.points.x[busiest]]
    # another sub-codebook: its own points and colours
    explorer.codebook.value = 3
    counts3 = np.bincount(codes[..., 3].flatten().numpy(), minlength=K)
    assert list(explorer.points.marker.color) == counts3.tolist()
    assert explorer.code.value == int(counts3.argmax())
    assert all(key[0] == "PCA" for key in explorer._cache)             # method="pca" never ran UMAP
    explorer.show_context.value = True
    assert_figure(explorer.static_figure())


def test_embedding_explorer_umap_runs_in_background(model, dataset, monkeypatch):
    """The UMAP path with a stand-in for umap_2d (the real one costs ~20 s on a fresh interpreter)."""
    import threading

    gate = threading.Event()

    def fake_umap(vectors, seed=0, **kwargs):
        gate.wait(10)                                   # still "computing" until the test lets it finish
        return embeddings_module.pca_2d(vectors) * 2 + 1

    monkeypatch.setattr(embeddings_module, "umap_2d", fake_umap)
    explorer = UW.TokenEmbeddingExplorer(model, dataset, num_images=8, method="umap")
    assert explorer.shown_method == "PCA" and "computing UMAP" in explorer.status.value   # instant preview
    gate.set()
    explorer.wait(10)
    assert explorer.shown_method == "UMAP"
    expected = embeddings_module.pca_2d(model.quantizer.normalized_codebooks()[0].detach().numpy()) * 2 + 1
    assert np.allclose(explorer.points.x, expected[:, 0])
    explorer.method.value = "PCA"                       # cached projections: switching back is instant
    assert explorer.shown_method == "PCA"


# ---------------------------------------------------------------------------------------------------------------
# TokenGrid
# ---------------------------------------------------------------------------------------------------------------

def test_token_grid_click_shows_the_patch_codes(model, dataset):
    item = dataset[5]
    grid = UW.TokenGrid(model, item)
    codes = model.encode(item["image"][None])[0]
    assert grid.codes.shape == (G, G, k)
    assert np.array_equal(np.asarray(grid.heatmap.text), codes[..., 0].numpy())        # the numbers are the codes
    grid._on_click(grid.heatmap, click(grid.heatmap, xs=[5], ys=[3]), None)   # x = column, y = row
    assert (grid.row.value, grid.col.value) == (3, 5)
    assert grid.selected_codes == codes[3, 5].tolist()
    for code in codes[3, 5].tolist():
        assert f"<b>{code}</b>" in grid.table.value
    box = grid.figure.layout.shapes[-1]
    assert (box.x0, box.y0) == (4.5, 2.5)
    grid.row.value, grid.col.value = 7, 0                          # the slider fallback
    assert grid.selected_codes == codes[7, 0].tolist()
    grid.codebook.value = 2
    assert np.array_equal(np.asarray(grid.heatmap.text), codes[..., 2].numpy())
    grid.opacity.value = 0.5
    assert grid.overlay.opacity == 0.5
    assert grid.index.layout.display == "none"                      # one image: no image slider
    assert_figure(grid.static_figure())


def test_token_grid_colours_are_code_identities(model, dataset):
    """Equal colour must mean the same code: a discrete palette for the codes that repeat, grey for the rest."""
    codes = np.array([[5, 5, 7], [9, 5, 7], [1, 2, 3]])
    slots, coloured = UW.token_grid.identity_slots(codes, size=9)
    assert coloured == [5, 7]                                        # by count, then by code id
    assert slots.tolist() == [[0, 0, 1], [9, 0, 1], [9, 9, 9]]       # codes seen once share the grey slot 9
    many = np.arange(40).repeat(2).reshape(8, 10)                    # 40 codes, each twice: only 9 get a colour
    slots, coloured = UW.token_grid.identity_slots(many, size=9)
    assert coloured == list(range(9)) and (slots[many >= 9] == 9).all()

    grid = UW.TokenGrid(model, dataset, index=2, num_images=6)
    for i in range(k):
        grid.codebook.value = i
        z, text = np.asarray(grid.heatmap.z), np.asarray(grid.heatmap.text)
        for slot in set(z.flatten().tolist()) - {UW.token_grid.PALETTE_SIZE}:
            assert len(set(text[z == slot].tolist())) == 1, "one colour, one code"
        for code in grid.coloured_codes:
            assert len(set(z[text == code].tolist())) == 1, "one code, one colour"
        assert grid.heatmap.zmin == -0.5 and grid.heatmap.zmax == UW.token_grid.PALETTE_SIZE + 0.5
    assert "Equal colour = the same code" in grid.legend.value
    # the image slider picks another image of the data
    first = grid.codes.copy()
    grid.index.value = 4
    assert np.array_equal(grid.codes, model.encode(dataset[4]["image"][None])[0].numpy())
    assert not np.array_equal(first, grid.codes)
    grid.close()


# ---------------------------------------------------------------------------------------------------------------
# ZeroShotPanel
# ---------------------------------------------------------------------------------------------------------------

def test_zero_shot_ranking_equals_direct_computation(model, dataset):
    panel = UW.ZeroShotPanel(model, dataset, num_images=12)
    assert panel.classnames == list(ShapesDataset.SHAPES)              # the dataset's first task by default
    panel.classes.value = "circle\nsquare\ntriangle\nred star"
    panel.templates.value = "a photo of a {}.\na drawing of a {}."
    panel.index.value = 4

    classifier = zero_shot.zero_shot_classifier(model, ["circle", "square", "triangle", "red star"],
                                        ["a photo of a {}.", "a drawing of a {}."])
    with torch.no_grad():
        feature = model.encode_image(dataset[4]["image"][None])
    cos = (feature @ classifier)[0]
    probs = (100 * cos).softmax(-1)
    order = probs.argsort(descending=True).tolist()
    names = ["circle", "square", "triangle", "red star"]
    ranking = panel.ranking
    assert [n for n, _ in ranking] == [names[j] for j in order]
    assert [p for _, p in ranking] == pytest.approx([float(probs[j]) for j in order], abs=1e-5)
    assert list(panel.bars.y) == [names[j] for j in order]
    assert list(panel.bars.x) == pytest.approx([float(probs[j]) for j in order], abs=1e-5)
    assert list(panel.bars.customdata) == pytest.approx([float(cos[j]) for j in order], abs=1e-5)
    assert f"cos {float(cos[order[0]]):.2f}" in panel.bars.text[0]
    assert len(panel.predict([0, 1, 2])) == 3

    panel.scale.value = 1.0                                             # a flatter softmax over the same cosines
    assert [p for _, p in panel.ranking] == pytest.approx([float((1 * cos).softmax(-1)[j]) for j in order],
                                                          abs=1e-5)
    assert "softmax(1 · cos)" in panel.figure.layout.xaxis.title.text

    before = panel.classifier.clone()
    panel.templates.value = "no placeholder here"                       # a bad template: shown, not raised
    assert "{}" in panel.status.value and torch.equal(panel.classifier, before)
    assert_figure(panel.static_figure([0, 4]))


def test_zero_shot_class_lists_commas_lines_and_a_single_class(model, dataset):
    from unitok_widgets.zero_shot import parse_names

    assert parse_names("circle, star, heart") == (["circle", "star", "heart"], "read 3 comma-separated class names")
    assert parse_names("circle\n star \n\nheart\n")[0] == ["circle", "star", "heart"]
    assert parse_names("a red star, on the left\na blue heart")[0] == ["a red star, on the left", "a blue heart"]
    panel = UW.ZeroShotPanel(model, dataset, num_images=4)
    panel.classes.value = "circle, star, heart"
    assert panel.classnames == ["circle", "star", "heart"] and panel.classifier.shape[1] == 3
    assert "comma-separated" in panel.status.value
    panel.classes.value = "star"
    assert panel.classnames == ["star"] and "only one class" in panel.status.value
    assert panel.ranking == [("star", pytest.approx(1.0))]
    panel.classes.value = "star\ncross"
    assert panel.status.value == ""
    panel.close()


def test_zero_shot_layout_fits_and_wraps_from_900_px(model, dataset):
    """Three fixed-width columns inside a wrapping row: at >= ~960 px they sit side by side, below that the bars
    move under the controls; the Apply button is the third item of the first column (never scrolled away)."""
    panel = UW.ZeroShotPanel(model, dataset, num_images=4)
    body = panel.widget.children[-1]
    assert body.layout.flex_flow == "row wrap"
    left, middle, figure = panel.columns
    widths = [int(left.layout.width.rstrip("px")), int(middle.layout.width.rstrip("px")), figure.layout.width]
    margins = 2 * 16
    assert sum(widths) + margins <= 960, widths
    assert max(widths) <= 900
    assert panel.apply_button in left.children[2].children
    assert left.layout.min_width == left.layout.width               # a column never shrinks below its content
    panel.close()


# ---------------------------------------------------------------------------------------------------------------
# one API for every view
# ---------------------------------------------------------------------------------------------------------------

VIEWS = [UW.CodebookUsage, UW.ReconstructionViewer, UW.TokenEmbeddingExplorer, UW.TokenGrid, UW.ZeroShotPanel]


@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v.__name__)
def test_every_view_is_built_as_model_data_options(view):
    params = list(inspect.signature(view.__init__).parameters.values())[1:]
    assert [p.name for p in params[:2]] == ["model", "data"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[2:]), view
    assert "num_images" in {p.name for p in params}
    assert callable(view.close) and callable(view.static_figure)
    dashboard = list(inspect.signature(UW.TrainingDashboard.__init__).parameters.values())[1:]
    assert dashboard[0].name == "trainer" and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in dashboard[1:])


def test_same_role_same_name_and_close_closes_everything(model, dataset, trainer):
    views = [UW.CodebookUsage(model, dataset, num_images=4), UW.ReconstructionViewer(model, dataset, num_images=4),
             UW.TokenEmbeddingExplorer(model, dataset, num_images=4, method="pca"),
             UW.TokenGrid(model, dataset, num_images=4), UW.ZeroShotPanel(model, dataset, num_images=4),
             UW.TrainingDashboard(trainer)]
    for view in views:
        # every view with a plotly figure calls it `figure` (the ReconstructionViewer shows images only)
        assert hasattr(view, "figure") or isinstance(view, UW.ReconstructionViewer), type(view).__name__
        assert "unitok-view" in view.widget._dom_classes                # the shared style (disabled buttons) applies
    for view in views[1:5]:
        assert hasattr(view, "status") or hasattr(view, "caption")
    for view in (views[1], views[3], views[4]):
        assert isinstance(view.index, __import__("ipywidgets").IntSlider)
    for view in views[:4]:
        assert isinstance(view.codebook, __import__("ipywidgets").Dropdown)

    def tree(widget):
        yield widget
        for child in getattr(widget, "children", ()) or ():
            yield from tree(child)

    for view in views:
        widgets = list(tree(view.widget))
        view.close()
        assert view.closed and all(w.comm is None for w in widgets), type(view).__name__
    assert views[-1]._on_step not in trainer.callbacks["step"]


def test_disabled_buttons_are_styled(trainer):
    from unitok_widgets._common import VIEW_CSS

    assert ":disabled" in VIEW_CSS and "opacity" in VIEW_CSS
    dash = UW.TrainingDashboard(trainer)
    try:
        assert dash.pause_button.disabled and VIEW_CSS in dash.widget.children[0].value
    finally:
        dash.close()


def test_notebook_setup_modes(monkeypatch, tmp_path):
    from unitok_widgets import lab as L

    assert L.current_mode({}) == "classroom"
    assert L.current_mode({"UNITOK_SMOKE": "1", "UNITOK_MODE": "full"}) == "smoke"
    assert L.current_mode({"UNITOK_MODE": "Full"}) == "full"
    with pytest.raises(ValueError, match="UNITOK_MODE must be one of"):
        L.current_mode({"UNITOK_MODE": "fast"})
    monkeypatch.setenv("UNITOK_MODE", "full")
    monkeypatch.delenv("UNITOK_SMOKE", raising=False)
    monkeypatch.delenv("UNITOK_CHECKPOINT", raising=False)
    lab = L.notebook_setup(checkpoint=True, quiet=True)
    assert lab.mode == "full" and lab.pick(smoke=1, classroom=2, full=3) == 3
    assert (lab.root / "pyproject.toml").is_file() and lab.uses_bundled_checkpoint == (lab.bundled / "model.safetensors").is_file()
    monkeypatch.setenv("UNITOK_CHECKPOINT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        L.notebook_setup(checkpoint=True, quiet=True)


def test_stoppable_turns_an_interrupt_into_one_line_that_still_stops_the_queue():
    from unitok_widgets import lab as L

    lab = L.Lab(mode="smoke", root=Path("."))
    one, two = types.SimpleNamespace(step_count=7), types.SimpleNamespace(step_count=9)
    shown = []
    for trainers in ((one,), (one, two)):
        with pytest.raises(TrainingInterrupted) as stopped:
            with lab.stoppable(*trainers):
                raise KeyboardInterrupt
        assert stopped.value.__cause__ is None and stopped.value.__suppress_context__
        [line] = stopped.value._render_traceback_()
        shown.append(line.split(". The cells below")[0])
    assert shown == ["■ stopped at step 7; the model keeps its weights",
                     "■ stopped at steps 7, 9; the models keep their weights"]


# ---------------------------------------------------------------------------------------------------------------
# layering
# ---------------------------------------------------------------------------------------------------------------

def test_unitok_never_imports_widget_libraries():
    code = ("import sys, unitok, unitok.training.tokenizer_trainer, unitok.evaluation.tokenizer, unitok.data.datasets\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('ipywidgets', 'plotly', 'unitok_widgets', 'anywidget', 'IPython'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_pre_run_copies_drop_live_widgets_and_shrink_pictures():
    import base64
    import io

    import nbformat
    from PIL import Image

    from unitok_widgets import lab as L

    rng = np.random.default_rng(0)
    picture = np.repeat(rng.integers(0, 4, (60, 80, 1)) * 60, 3, axis=2).astype(np.uint8)   # 4 grey levels
    buffer = io.BytesIO()
    Image.fromarray(picture).convert("RGBA").save(buffer, format="PNG")
    png = base64.b64encode(buffer.getvalue()).decode()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [nbformat.v4.new_output("display_data", data={L.WIDGET_VIEW: {"model_id": "abc"},
                                                                  "text/plain": "<View object>"}),
                    nbformat.v4.new_output("display_data", data={"image/png": png, "text/plain": "<Figure>"})]
    nb = nbformat.v4.new_notebook(cells=[cell])
    assert L.strip_widget_views(nb) == 1
    assert cell.outputs[0]["data"] == {"text/plain": L.WIDGET_NOTE}
    assert L.shrink_pngs(nb) > 0
    with Image.open(io.BytesIO(base64.b64decode(cell.outputs[1]["data"]["image/png"]))) as small:
        assert np.array_equal(np.asarray(small.convert("RGB")), picture)      # four colours survive exactly
