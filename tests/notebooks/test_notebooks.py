"""The lab-manual notebooks: stored clean, written as a lab manual, and every one runs top to bottom headless in
smoke mode, followed by its checks in the same kernel.

The notebooks themselves end in exercises, not assertions: a student who presses Step once more, interrupts a
training cell or changes a number must never be left with a failing cell. The checks that keep the notebooks
honest live here (`CHECKS`): after the notebook has run, one more cell with them is executed in the same kernel,
so it sees every variable the notebook made. The kernel is the `python3` kernel of the interpreter running pytest
(the project's virtual environment).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.notebook

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
OURS = ["00_quickstart", "01_train_step_by_step", "02_codebook_utilization", "03_reconstructions",
        "04_token_embeddings", "05_zero_shot_understanding", "06_bring_your_own_data", "07_generation",
        "08_released_checkpoint", "09_paper_in_miniature", "11_straight_through_estimator",
        "12_attention_projection", "13_which_quantizer"]

# Run after the notebook, in its kernel (smoke mode). Each ends by printing "checks passed".
CHECKS = {
    "00_quickstart": """
assert lab.mode == "smoke" and lab.uses_bundled_checkpoint
assert codes.shape == (1, cfg.grid_size, cfg.grid_size, cfg.num_codebooks)
assert codes.dtype == torch.int64 and 0 <= int(codes.min()) and int(codes.max()) < cfg.codebook_size
assert decoded.shape == (1, 3, cfg.image_size, cfg.image_size)
assert torch.equal(decoded, reconstructed), "decode(encode(x)) must equal reconstruct(x)"
assert image_feature.shape == (1, cfg.embed_dim)
assert torch.allclose(image_feature.norm(dim=-1), torch.ones(1), atol=1e-4)
assert per_image.shape == (N,) and torch.isfinite(per_image).all()
assert params.loc["total", "parameters"] == model.num_parameters()
assert token_grid.selected_codes == [int(v) for v in model.encode(test[3]["image"][None])[0, 0, 0]]
assert per_image.mean() > 24.0, f"bundled checkpoint PSNR {per_image.mean():.2f} dB is below the 24 dB floor"
if "psnr" in summary:
    assert abs(float(per_image.mean()) - summary["psnr"]) < 2.5, "PSNR far from what summary.json recorded"
""",
    "01_train_step_by_step": """
k = trainer.model_config.num_codebooks
assert len(trainer.history) == 1 + TRAIN_STEPS == trainer.step_count
assert {"loss", "l1", "l2", "vq", "clip", "psnr_batch", "lr"} <= set(first)
assert all(math.isfinite(m["loss"]) for m in trainer.history)
assert len(first["codebook_usage"]) == len(first["dead_codes"]) == len(first["perplexity"]) == k
assert len(results["codebook_usage"]) == k and results["eval_images"] == EVAL_IMAGES
assert 0.0 <= results["zero_shot_top1"] <= 1.0
assert list(history.index) == list(range(1, TRAIN_STEPS + 2))
assert dashboard.timings["redraws"] >= 1 and list(dashboard.usage_heatmap.x)[-1] == trainer.step_count
assert [r["step"] for r in recorded] == [400, 800, 1200, 1600]         # the bundled run's curve it is drawn beside
""",
    "02_codebook_utilization": """
for name, trainer in runs.items():
    k, K = trainer.model_config.num_codebooks, trainer.model_config.codebook_size
    r = results[name]
    assert trainer.step_count == STEPS and len(trainer.history) == STEPS
    assert len(r["codebook_usage"]) == len(r["dead_codes"]) == len(r["perplexity"]) == k, name
    assert all(0 <= d <= K for d in r["dead_codes"]) and all(1 <= p <= K + 1e-6 for p in r["perplexity"]), name
    assert r["codebook_window_tokens"] == EVAL_IMAGES * trainer.model_config.num_tokens, name
    assert math.isfinite(r["psnr"]), name
assert len(usage_mcq.stats["codebook_usage"]) == 8 and len(usage_single.stats["codebook_usage"]) == 1
assert usage_mcq.window_tokens == usage_single.window_tokens      # compared over the same window
assert runs[restart_name].model.quantizer.dead_code_restart_every == RESTART_EVERY
assert set(comparison.index) >= {"bits per token", "usage % (mean)", "dead codes (total)"}
""",
    "03_reconstructions": """
assert codes.shape == (N_IMAGES, cfg.grid_size, cfg.grid_size, k)
assert scores.shape == (N_IMAGES,) and np.isfinite(scores).all()
assert len(drops) == k and len(viewer_drops["drops"]) == k
assert information.shape == (k, len(selections)) and (information.abs() <= 1 + 1e-9).all().all()
assert scores.mean() > 24.0, f"bundled checkpoint: mean PSNR {scores.mean():.2f} dB below the 24 dB floor"
assert scores.mean() > scores_untrained.mean() + 5, "training should beat random weights by far"
assert np.mean(drops) > 0.5, "randomising a sub-codebook should hurt the reconstruction"
""",
    "04_token_embeddings": """
assert codebooks.shape == (k, K, cfg.latent_dim // k)
assert torch.allclose(codebooks.norm(dim=-1), torch.ones(k, K), atol=1e-5)
assert counts.shape == (k, K) and counts.sum(1).tolist() == [window] * k
assert window == NUM_IMAGES * cfg.num_tokens
xy = explorer.projection()
assert xy is not None and xy.shape == (K, 2) and np.isfinite(xy).all()
assert len(spreads) == k and np.isfinite(spreads).all() and (spreads < 1).all()
assert 0 < distinct <= window
""",
    "05_zero_shot_understanding": """
assert set(accuracy.index) == set(tasks)
assert ((accuracy.filter(like="top-1") >= 0) & (accuracy.filter(like="top-1") <= 100)).all().all()
# the linear probe: shape and colour on both splits; a held-out colour x shape pair is a class it never saw
probe = accuracy.filter(like="probe %")
assert list(probe.columns) == ["seen probe %", "held-out probe %"]
assert np.isnan(probe.loc["colour_shape", "held-out probe %"])
assert ((probe.loc[["shape", "colour"]] >= 0) & (probe.loc[["shape", "colour"]] <= 100)).all().all()
assert train_x.shape == (2 * N_IMAGES, cfg.width)
for name, (classnames, _, _) in tasks.items():
    assert classifiers[name].shape == (cfg.embed_dim, len(classnames))
assert data["seen"][1].shape == data["held-out"][1].shape == (N_IMAGES, cfg.embed_dim)
assert len(per_pair) >= 1 and all(row["images"] > 0 for row in per_pair)
assert top.shape == (len(queries), 6)
assert len(panel.ranking) == len(panel.classnames)
# the temperature section: the accuracy does not depend on the scale, the confidence grows with it
assert confidence["top-1 accuracy %"].nunique() == 1
assert confidence["mean top probability %"].is_monotonic_increasing or learned >= 100
assert 1 <= learned <= 100 + 1e-3
# the bundled checkpoint names colour x shape far above chance, even for unseen pairs
assert accuracy.loc["colour_shape", "seen top-1 %"] > 10 * accuracy.loc["colour_shape", "chance %"], accuracy
assert accuracy.loc["colour_shape", "held-out top-1 %"] > 5 * accuracy.loc["colour_shape", "chance %"], accuracy
""",
    "06_bring_your_own_data": """
assert len(folder_data) == len(rows) and not folder_data.skipped
assert trainer.step_count == FINETUNE_STEPS and len(trainer.history) == FINETUNE_STEPS
assert np.isfinite([psnr_before, psnr_after]).all()
assert images.shape == (len(rows), 3, cfg.image_size, cfg.image_size)
if fashion is not None:
    assert fashion.step_count == FASHION_STEPS
    assert 0.0 <= fashion_results["zero_shot_top1"] <= 1.0 and np.isfinite(fashion_results["psnr"])
    assert fashion_recon.shape == (10, 3, 32, 32)
""",
    "07_generation": """
assert depth.step_count == parallel.step_count == STEPS and len(depth.history) == STEPS
assert after["bits_per_subcode_test"] < before["bits_per_subcode_test"]          # training lowers held-out NLL
assert abs(before["bits_per_subcode_test"] - 8.0) < 1e-3                       # zero-initialised classifier
assert explorer.codes.shape == (8, 8, 8, 8) and explorer.filled == lab.pick(smoke=2, classroom=10, full=10)
assert len(explorer.last_choices) == 8
assert set(sweep.columns) >= {"colour %", "shape %", "diversity"} and len(sweep) == 5
assert ((sweep[["colour %", "shape %"]] >= 0) & (sweep[["colour %", "shape %"]] <= 100)).all().all()
assert list(heads.index) == ["depth", "parallel"] and np.isfinite(heads.to_numpy()).all()
assert red_star.shape == (24, 8, 8, 8) and list(pairs.columns) == ["seen pairs", "held-out pairs"]
assert ((pairs >= 0) & (pairs <= 100)).all().all()
assert list(rows) == ["best of 1", "best of 2", "best of 4"] and codes.shape == (18, 8, 8, 8)
assert all(0 <= row["shape %"] <= 100 and 0 <= row["colour %"] <= 100 for row in rows.values())
""",
    "08_released_checkpoint": """
assert path is None and "random" in source                       # smoke mode never loads the multi-GB file
assert cfg.encoder == "vitamin_large" and cfg.decoder == "vitamin" and cfg.projection == "attn_reference"
assert images.shape == (N_IMAGES, 3, 256, 256) and float(images.min()) >= -1 and float(images.max()) <= 1
assert codes.shape == (N_IMAGES, 16, 16, 8) and int(codes.max()) < 4096
assert torch.equal(reference_codes[:, 3, 17], codes[:, 1, 1, 3])  # (B, k, L), L row-major over the grid
assert torch.equal(unitok.codes_from_reference(reference_codes), codes)
assert recon.shape == images.shape and float(recon.abs().max()) <= 1
assert scores.shape == (N_IMAGES,) and torch.isfinite(scores).all()
assert usage.window_tokens == N_IMAGES * 256 and len(usage.stats["codebook_usage"]) == 8
assert token_grid.codes.shape == (16, 16, 8)
assert zero_shot.probabilities.shape == (N_IMAGES, len(CLASSES))
assert 0.0 < changed <= 1.0                                      # causal attention changes some codes
""",
    "11_straight_through_estimator": """
assert g_hard is None, "lookup() must not pass a gradient to z"
assert torch.allclose(g_ste, g_identity) and g_ste.abs().sum() > 0
assert (gradients["with STE"] > 0).all()
assert (gradients["without STE, no VQ term"] == 0).all()
assert (gradients["without STE (VQ term only)"] < gradients["with STE"]).all()
assert len(toy) == TOY_STEPS and np.isfinite(toy.to_numpy()).all()
""",
    "09_paper_in_miniature": """
assert {"codebooks", "projection"} <= set(summary.study) and len(records) >= 5
assert all(r["seed"] in (0, 1, 2) and r["train_seconds"] > 0
           and (r["config"]["steps"] if r["study"] == "generation" else r["config"]["train"]["steps"]) == 200
           for r in records)
k = summary[(summary.study == "codebooks") & (summary.metric == "psnr")].set_index("setting")
assert {"k=1", "k=8"} <= set(k.index) and k.loc["k=8", "mean"] > k.loc["k=1", "mean"]
assert len(verdicts) >= 4 and set(verdicts.study) >= {"codebooks", "projection"}
assert all(v.startswith(("holds", "reversed", "not resolved", "does not hold")) for v in verdicts.verdict)
assert len(live_records) == 2 * LIVE_SEEDS and {r["setting"] for r in live_records} == {"attn", "linear"}
assert (live_dir / "results.jsonl").is_file() and (live_dir / "report.md").is_file()
""",
    "12_attention_projection": """
assert all(t.step_count == STEPS for t in runs.values())
assert rows["attn"]["output tokens changed (of 64)"] == 64 and rows["linear"]["output tokens changed (of 64)"] == 1
assert runs["attn"].model.num_parameters() > runs["linear"].model.num_parameters()
assert comparison.loc["PSNR (dB)"].notna().all() and np.isfinite(comparison.loc["PSNR (dB)", ["attn", "linear"]]).all()
assert 0 <= comparison.loc["zero-shot top-1 % (seen)", "attn"] <= 100
""",
    "13_which_quantizer": """
assert set(rows) == {"mcq", "rvq", "fsq", "lfq", "simvq"}
assert {r["bits per token"] for r in rows.values()} == {64.0}
assert all(r["codes shape"] == (2, 64, 8) for r in rows.values())
assert all(t.step_count == STEPS for t in runs.values()) and set(runs) == set(CONTENDERS)
assert [type(t.model.quantizer).__name__ for t in runs.values()] == ["MultiCodebookQuantizer", "ResidualQuantizer"]
for name, r in results.items():
    assert math.isfinite(r["psnr"]) and len(r["codebook_usage"]) == runs[name].model_config.num_codebooks, name
assert all(v.window_tokens == EVAL_IMAGES * runs[n].model_config.num_tokens for n, v in usage_views.items())
assert all(len(v.selected_codes) == runs[n].model_config.num_codebooks for n, v in grid_views.items())
assert {r["setting"] for r in records} == {"mcq", "rvq", "fsq", "lfq", "simvq"}
assert "Verdicts" in format_verdicts(summary_rows, "quantizers")
assert set(nll["quantizer"]) == {"mcq", "rvq", "fsq", "lfq", "simvq"}
""",
}


def test_our_notebooks_are_there():
    names = [p.stem for p in NOTEBOOKS]
    assert all(name in names for name in OURS), sorted(set(OURS) - set(names))


@pytest.mark.parametrize("name", OURS)
def test_notebook_is_a_lab_manual_stored_clean(name):
    """No outputs, no execution counts (diffs stay readable); opens with a title, the learning goal, the
    prerequisites and a run-time table for the three modes; sets up through the library helper; ends in
    exercises, not assertions."""
    path = NOTEBOOK_DIR / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.lstrip().startswith("#"), f"{name}: start with a title"
    for part in ("**Learning goal.**", "**Prerequisites.**", "**Run time on a 2-core laptop**", "| smoke |",
                 "| classroom |", "| full |"):
        assert part in first.source, f"{name}: the first cell should state {part!r}"
    code = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{name}: cells {dirty} have outputs or execution counts; clear them before committing"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    assert "notebook_setup(" in code[0].source, f"{name}: the first code cell should call notebook_setup()"
    assert "def repo_root" not in "".join(c.source for c in code), f"{name}: use notebook_setup, not a copy"
    assert nb.cells[-1].cell_type == "markdown" and "## Exercises" in nb.cells[-1].source, \
        f"{name}: end with an Exercises section"
    assert not any(line.lstrip().startswith("assert ") for c in code for line in c.source.splitlines()), \
        f"{name}: checks belong in tests/notebooks/test_notebooks.py (CHECKS), not in the notebook"
    assert name in CHECKS


def run_notebook(name: str, mode: str = "smoke", extra: str = "", timeout: int = 600):
    """Execute notebooks/<name>.ipynb in a fresh kernel (UNITOK_SMOKE=1 for smoke mode), then `extra` in the
    same kernel. Returns the executed notebook."""
    env = {"UNITOK_SMOKE": "1"} if mode == "smoke" else {"UNITOK_MODE": mode}
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    if extra:
        nb.cells.append(nbformat.v4.new_code_cell(extra))
    saved = {key: os.environ.get(key) for key in ("UNITOK_SMOKE", "UNITOK_MODE", "OMP_NUM_THREADS",
                                                  "UNITOK_CHECKPOINT")}
    os.environ.pop("UNITOK_SMOKE", None)
    os.environ.pop("UNITOK_CHECKPOINT", None)                # always the bundled checkpoint
    os.environ.update(env)
    # One intra-op thread: the test machines are small and shared, and an oversubscribed OpenMP pool is several
    # times slower than one thread.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                         resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
        client.execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return nb


@pytest.mark.parametrize("name", OURS)
def test_notebook_runs_in_smoke_mode_then_its_checks(name):
    start = time.perf_counter()
    try:
        nb = run_notebook(name, extra=CHECKS[name] + '\nprint("checks passed")\n')
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{name} failed in smoke mode (or its checks did):\n{error}", pytrace=False)
    print(f"{name}: {time.perf_counter() - start:.1f} s in smoke mode, checks included")
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "checks passed" in outputs
    assert "mode: smoke" in outputs


def test_words_match_the_model_they_describe():
    """Where a notebook states how the bundled model works, the model's config agrees: 00 says how encode_image
    pools the quantized tokens, and the bundled checkpoint pools that way."""
    import json

    config = json.loads((ROOT / "data" / "tiny-shapes" / "config.json").read_text())
    pool = config.get("model", config).get("image_pool", "mean")
    nb = nbformat.read(NOTEBOOK_DIR / "00_quickstart.ipynb", as_version=4)
    text = next(c.source for c in nb.cells if c.cell_type == "markdown" and "`encode_image`" in c.source)
    said = {"max": "**maximum**", "mean": "averages"}[pool]
    assert said in text, f"00 must say that encode_image pools by {pool}"
    assert ({"max": "averages", "mean": "**maximum**"}[pool]) not in text
