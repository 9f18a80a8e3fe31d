"""`unitok ablate`: the plan of each study, a smoke study end to end, skipping and resuming, the report's numbers."""
from __future__ import annotations

import json
import math

import pytest

from unitok.studies import roadmap, train_task
from unitok.studies.metrics import headline_metrics
from unitok.studies.plan import plan
from unitok.studies.report import format_table, report, summarize
from unitok.studies.runner import load_results, run_ablation
from unitok.studies.spec import Scale


@pytest.fixture
def fixed_peak(monkeypatch):
    """The matmul peak is measured before every run; a constant keeps the tests fast and the records comparable."""
    for module in (train_task, roadmap):
        monkeypatch.setattr(module, "matmul_peak", lambda *a, **k: 96.0)


def _smoke(tmp_path, tiny_overrides, studies="projection", seeds=2, log=None, out=None):
    return run_ablation(studies, seeds=seeds, steps=2, out=out or tmp_path / "abl", overrides=tiny_overrides,
                        fid="none", eval_images=16, device="cpu", log=log or (lambda *_: None))


# ------------------------------------------------------------------------------------------------ the plan
def test_codebooks_keep_code_vectors_and_latent_size_equal():
    tasks = plan(["codebooks"], 1, Scale())
    models = {t.setting: t.spec["model"] for t in tasks}
    assert list(models) == ["k=1", "k=2", "k=4", "k=8"]
    assert {m["num_codebooks"] * m["codebook_size"] for m in models.values()} == {8 * 256}
    assert {m["latent_dim"] for m in models.values()} == {32}
    assert models["k=1"]["codebook_size"] == 2048 and models["k=8"]["codebook_size"] == 256


def test_studies_share_the_default_run_and_differ_where_they_should():
    tasks = {(t.study, t.setting, t.seed): t for t in plan("codebooks,projection,supervision,init", [0, 1], Scale())}
    default = tasks[("codebooks", "k=8", 0)].key
    assert tasks[("projection", "attn", 0)].key == default
    assert tasks[("supervision", "joint", 0)].key == default
    assert tasks[("init", "scratch", 0)].key == default
    assert tasks[("codebooks", "k=8", 1)].key != default                       # the seed is part of the run
    assert tasks[("projection", "linear", 0)].spec["model"]["projection"] == "linear"
    assert tasks[("supervision", "recon-only", 0)].spec["model"]["clip_weight"] == 0
    contrastive = tasks[("supervision", "contrastive-only", 0)].spec["model"]
    assert (contrastive["l1_weight"], contrastive["l2_weight"], contrastive["vq_weight"]) == (0, 0, 1.0)
    assert tasks[("init", "clip-init", 0)].spec["clip_pretrain"] == {"steps": Scale().steps}
    assert tasks[("init", "clip-init", 0)].key != default


def test_unknown_study_is_a_value_error_naming_the_studies():
    with pytest.raises(ValueError, match="unknown study 'nope'.*codebooks, projection"):
        plan(["nope"], 1, Scale())


def test_cli_bad_study_is_one_line_exit_2(capsys):
    from unitok.cli import main

    assert main(["ablate", "codebookz"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unitok ablate: error: unknown study 'codebookz'") and "\n" not in err


def test_cli_report_needs_a_folder(capsys):
    from unitok.cli import main

    assert main(["ablate", "report"]) == 2
    assert "needs the ablation folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ metrics
def test_headline_metrics_from_an_evaluation():
    m = headline_metrics({"psnr": 20.0, "ssim": 0.5, "perplexity": [4.0, 8.0], "codebook_usage": [0.5, 1.0],
                          "fid": 30.0, "fid_extractor": "efficientnet_lite0 (proxy FID, not comparable)",
                          "zero_shot_top1": 0.25, "linear_probe_top1": 0.75, "linear_probe_shape_top1": 0.75, "retrieval_R@1": 0.1})
    assert m["effective_bits"] == pytest.approx(2 + 3)       # log2 4 + log2 8
    assert m["perplexity"] == 6.0 and m["codebook_usage"] == 0.75
    assert m["fid_proxy"] == 30.0 and "fid" not in m          # labelled as the proxy it is
    assert m["linear_probe_top1"] == 0.75 and "linear_probe_shape_top1" not in m
    assert "retrieval_R@1" not in m


# ------------------------------------------------------------------------------------------------ a smoke study
def test_smoke_study_end_to_end_then_skips_on_rerun(tmp_path, tiny_overrides, fixed_peak):
    lines = []
    records = _smoke(tmp_path, tiny_overrides, log=lines.append)
    out = tmp_path / "abl"
    assert sorted((r["setting"], r["seed"]) for r in records) == [("attn", 0), ("attn", 1), ("linear", 0),
                                                                  ("linear", 1)]
    saved = load_results(out)
    assert len(saved) == 4 and len((out / "results.jsonl").read_text().splitlines()) == 4
    for r in saved:
        assert {"psnr", "ssim", "zero_shot_top1", "zero_shot_top1_heldout", "codebook_usage", "perplexity",
                "effective_bits", "train_seconds"} <= set(r["metrics"])
        assert r["config"]["train"]["seed"] == r["seed"] and r["config"]["train"]["steps"] == 2
        assert r["config"]["model"]["projection"] == r["setting"]
        assert r["git"] and r["matmul_peak_gflops"] == 96.0
        assert r["peak_scaled_train_seconds"] == pytest.approx(r["train_seconds"] / 2, abs=0.01)
        run = out / r["run"]
        assert (run / "result.json").is_file() and (run / "best" / "model.safetensors").is_file()
        assert not (run / "checkpoint.pt").exists()            # finished: the weights live in best/
        assert not (run / ".lock").exists()
    # different seeds train different models; the same seed on another setting too
    assert len({r["metrics"]["psnr"] for r in saved}) == 4
    assert json.loads((out / "ablate.json").read_text())["scale"]["steps"] == 2
    assert any("[4/4]" in line for line in lines)

    # the same command again: nothing is trained, nothing is appended
    before = (out / "results.jsonl").read_text()
    again = []
    records2 = _smoke(tmp_path, tiny_overrides, log=again.append)
    assert (out / "results.jsonl").read_text() == before
    assert "4 already in" in again[0] and "0 distinct runs to train" in again[0]
    assert sorted(r["metrics"]["psnr"] for r in records2) == sorted(r["metrics"]["psnr"] for r in records)

    # another scale in the same folder is refused; a shared setting in another study is not trained again
    with pytest.raises(ValueError, match="another scale.*steps: 2 there, 3 now"):
        run_ablation("projection", seeds=1, steps=3, out=out, overrides=tiny_overrides, fid="none",
                     eval_images=16, device="cpu", log=lambda *_: None)
    shared = []
    _smoke(tmp_path, tiny_overrides, studies="supervision", seeds=[0], log=shared.append)
    joint = [r for r in load_results(out) if r["study"] == "supervision" and r["setting"] == "joint"]
    attn0 = [r for r in saved if r["setting"] == "attn" and r["seed"] == 0][0]
    assert joint[0]["run"] == attn0["run"] and joint[0]["metrics"] == attn0["metrics"]
    assert "2 distinct runs to train (1 more shared" in shared[0]     # recon-only, contrastive-only


def test_a_killed_study_resumes_without_duplicates(tmp_path, tiny_overrides, fixed_peak):
    def stop_after_first(line):
        if line.startswith("[1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _smoke(tmp_path, tiny_overrides, log=stop_after_first)
    out = tmp_path / "abl"
    assert len(load_results(out)) == 1
    assert not (out / ".lock").exists()                         # the study's lock was released
    resumed = []
    _smoke(tmp_path, tiny_overrides, log=resumed.append)
    saved = load_results(out)
    assert len(saved) == 4
    assert len({(r["setting"], r["seed"]) for r in saved}) == 4
    assert "1 already in" in resumed[0]


@pytest.mark.slow
def test_contrastive_only_leaves_the_decoder_untrained(tmp_path, tiny_overrides, fixed_peak):
    """Contrastive only has no pixel loss, so it reconstructs far worse than joint training after the same steps;
    recon-only has no CLIP loss, so its text tower is never trained (its zero-shot is whatever chance gives)."""
    records = run_ablation("supervision", seeds=1, steps=12, out=tmp_path / "sup", overrides=tiny_overrides,
                           fid="none", eval_images=16, device="cpu", log=lambda *_: None)
    psnr = {r["setting"]: r["metrics"]["psnr"] for r in records}
    assert psnr["contrastive-only"] < psnr["joint"] - 1.0
    assert psnr["contrastive-only"] < psnr["recon-only"] - 1.0


# ------------------------------------------------------------------------------------------------ the report
def _record(study, setting, seed, **metrics):
    return {"study": study, "setting": setting, "seed": seed, "run": f"runs/{study}-{setting}-{seed}",
            "metrics": metrics, "train_seconds": 10.0, "matmul_peak_gflops": 96.0, "peak_scaled_train_seconds": 5.0}


def test_report_mean_and_std_on_a_hand_made_file(tmp_path):
    records = [_record("codebooks", "k=8", s, psnr=p, zero_shot_top1=z)
               for s, (p, z) in enumerate([(20.0, 0.1), (22.0, 0.2), (24.0, 0.3)])]
    records += [_record("codebooks", "k=1", 0, psnr=18.5), _record("projection", "linear", 0, psnr=1.0),
                _record("projection", "attn", 0, psnr=2.0)]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = {(r["study"], r["setting"], r["metric"]): r for r in summarize(load_results(path))}
    k8 = rows[("codebooks", "k=8", "psnr")]
    assert (k8["mean"], k8["std"], k8["n"]) == (22.0, 2.0, 3)                 # sample std (ddof = 1)
    z = rows[("codebooks", "k=8", "zero_shot_top1")]
    assert z["mean"] == pytest.approx(0.2) and z["std"] == pytest.approx(0.1)
    assert math.isnan(rows[("codebooks", "k=1", "psnr")]["std"])              # one seed: no spread
    # settings come in the study's order (k=1 before k=8), studies in the canonical order
    order = [(r["study"], r["setting"]) for r in summarize(records) if r["metric"] == "psnr"]
    assert order == [("codebooks", "k=1"), ("codebooks", "k=8"), ("projection", "attn"), ("projection", "linear")]

    text = report(tmp_path)
    assert "| k=8 | 22.00 ± 2.00 (3) | 0.200 ± 0.100 (3) |" in text
    assert "| k=1 | 18.50 ± – (1) | – |" in text
    assert (tmp_path / "report.md").read_text() == text
    assert (tmp_path / "ablation_codebooks.png").stat().st_size > 1000
    assert not (tmp_path / "ablation_codebooks.html").exists()       # the library draws PNGs only
    pytest.importorskip("plotly")
    from unitok_widgets.studies import write_html_report              # the interactive pages are a widget's

    assert [p.name for p in write_html_report(tmp_path)] == ["ablation_codebooks.html", "ablation_projection.html"]
    html = (tmp_path / "ablation_codebooks.html").read_text()
    assert "plotly" in html and "error_y" in html


def test_results_file_damage(tmp_path):
    good = json.dumps(_record("codebooks", "k=1", 0, psnr=1.0))
    path = tmp_path / "results.jsonl"
    path.write_text(good + "\n" + good[:20])                 # a torn last line is skipped
    assert len(load_results(path)) == 1
    path.write_text(good[:20] + "\n" + good + "\n")           # damage in the middle is an error naming the line
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        load_results(path)
    with pytest.raises(FileNotFoundError, match="results.jsonl"):
        load_results(tmp_path / "nowhere")


def test_format_table_lists_only_metrics_present():
    text = format_table(summarize([_record("init", "scratch", 0, psnr=20.0, zero_shot_top1=0.3),
                                   _record("init", "clip-init", 0, psnr=19.0, zero_shot_top1=0.4,
                                           clip_zero_shot_top1=0.5)]))
    header = [line for line in text.splitlines() if line.startswith("| setting")][0]
    assert "zero-shot of the pre-trained continuous CLIP" in header and "FID" not in header
    assert "| scratch | 20.00 ± – (1) | 0.300 ± – (1) | – |" in text


@pytest.mark.slow
def test_generation_study_smoke(tmp_path, tiny_overrides, fixed_peak, monkeypatch):
    """Two tokenizers (k = 1 and k = 8 of the codebooks study) are trained first, then a generator on each one's
    codes; the record holds the held-out NLL and the prompt accuracy of samples."""
    from unitok.evaluation import shape_classifier
    from unitok.generator import codes as generator_codes

    original = shape_classifier.load_shape_classifier
    monkeypatch.setattr(shape_classifier, "load_shape_classifier",   # a quick measuring CNN, cached in tmp_path
                        lambda image_size, **kw: original(image_size, cache_dir=tmp_path / "cache", steps=5,
                                                          progress=False))
    monkeypatch.setattr(generator_codes, "default_cache_dir", lambda: tmp_path / "cache")
    records = run_ablation("generation", seeds=1, steps=2, out=tmp_path / "gen", overrides=tiny_overrides,
                           fid="none", eval_images=16, device="cpu", log=lambda *_: None)
    assert sorted(r["setting"] for r in records) == ["k=1", "k=8"]
    for r in records:
        m = r["metrics"]
        assert m["gen_nll_bits"] > 0 and 0 <= m["gen_prompt_accuracy"] <= 1
        assert r["config"]["generator"]["num_codebooks"] == int(r["setting"][2:])
    # the tokenizers were trained as codebooks runs in the same folder, without results lines of their own
    assert {r["study"] for r in load_results(tmp_path / "gen")} == {"generation"}
    assert len(list((tmp_path / "gen" / "runs").iterdir())) == 4
