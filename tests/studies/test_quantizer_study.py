"""The `quantizers` study: its plan (equal bits, a generator and a unified model on each tokenizer), a smoke run end to
end with the consumers, and the report's verdicts and correlations on hand-made numbers."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from unitok.studies import plan as plan_module
from unitok.studies import roadmap, train_task
from unitok.studies.plan import STUDIES, plan
from unitok.studies.report import report, summarize
from unitok.studies.runner import load_results, run_ablation
from unitok.studies.spec import Scale, spec_hash
from unitok.studies.verdicts import correlations, format_correlations, format_verdicts, separation, verdicts


def test_the_plan_trains_a_tokenizer_then_a_generator_and_a_unified_model_on_its_codes():
    tasks = plan("quantizers", seeds=2, scale=Scale())
    assert len(tasks) == 2 * 5 * 3
    by_cell = {}
    for t in tasks:
        by_cell.setdefault((t.setting, t.seed), {})[t.spec["kind"]] = t
    assert sorted({s for s, _ in by_cell}) == ["fsq", "lfq", "mcq", "rvq", "simvq"]
    for (setting, seed), kinds in by_cell.items():
        assert set(kinds) == {"tokenizer", "generator", "mllm"}
        tok = kinds["tokenizer"]
        assert tok.spec["model"].get("quantizer", "mcq") == setting and tok.spec["train"]["seed"] == seed
        for consumer in ("generator", "mllm"):       # both read exactly this tokenizer run's codes
            assert kinds[consumer].spec["tokenizer_key"] == tok.key == spec_hash(kinds[consumer].spec["tokenizer"])
        assert kinds["generator"].spec["generator_overrides"] == ["cpu_bf16=off"]
        assert kinds["mllm"].spec["mllm"] == {"image_input": "codebook"}
    # equal bits: lfq's latent is one dimension per bit, the others keep the preset's
    latent = {s: by_cell[(s, 0)]["tokenizer"].spec["model"]["latent_dim"] for s in ("mcq", "fsq", "lfq")}
    assert latent == {"mcq": 32, "fsq": 32, "lfq": 64}
    # the MCQ arm is the same run as the default tokenizer of the other studies (shared, trained once)
    codebooks_k8 = [t for t in plan("codebooks", seeds=1, scale=Scale()) if t.setting == "k=8"][0]
    assert by_cell[("mcq", 0)]["tokenizer"].key == codebooks_k8.key
    assert "quantizers" not in plan_module.ORDER          # asked for by name: not part of "all"


@pytest.mark.slow
def test_quantizer_study_smoke_with_its_consumers(tmp_path, tiny_overrides, monkeypatch):
    """One contender (residual VQ: the one whose token is a sum of its sub-codes' vectors), one seed, two steps of
    everything: the tokenizer's record is joined by its generator's and its unified model's, under the same study,
    setting and seed, with their own training times."""
    from unitok.evaluation import shape_classifier
    from unitok.generator import codes as generator_codes

    for module in (train_task, roadmap):
        monkeypatch.setattr(module, "matmul_peak", lambda *a, **k: 96.0)
    original = shape_classifier.load_shape_classifier
    monkeypatch.setattr(shape_classifier, "load_shape_classifier",
                        lambda image_size, **kw: original(image_size, cache_dir=tmp_path / "cache", steps=5,
                                                          progress=False))
    monkeypatch.setattr(generator_codes, "default_cache_dir", lambda: tmp_path / "cache")
    one = dataclasses.replace(STUDIES["quantizers"], settings=(STUDIES["quantizers"].setting("rvq"),))
    monkeypatch.setitem(STUDIES, "quantizers", one)
    out = tmp_path / "q"
    records = run_ablation("quantizers", seeds=1, steps=2, out=out, overrides=tiny_overrides, fid="none",
                           eval_images=16, device="cpu", log=lambda *_: None)
    assert sorted((r["setting"], r["kind"]) for r in records) == [
        ("rvq", "generator"), ("rvq", "mllm"), ("rvq", "tokenizer")]
    for r in records:
        m = r["metrics"]
        if r["kind"] == "tokenizer":
            assert r["config"]["model"]["quantizer"] == r["setting"] and m["psnr"] > 0 and "train_seconds" in m
            assert 0 <= m["codebook_usage"] <= 1 and math.isfinite(m["pairwise_mi_bits"])
        elif r["kind"] == "generator":
            assert m["gen_nll_bits"] > 0 and "generator_train_seconds" in m and "train_seconds" not in m
            assert r["config"]["generator"]["quantizer"] == r["setting"]
        else:
            assert 0 <= m["mllm_vqa_acc"] <= 1 and "mllm_train_seconds" in m and "train_seconds" not in m
    text = report(out)
    assert "#### quantizers: verdicts" not in text          # one seed: no spread, no verdict
    assert "| rvq |" in text
    assert (out / "quantizers_curves.png").stat().st_size > 1000     # drawn from the run folders' metrics.jsonl
    # a second run finds everything finished
    again = run_ablation("quantizers", seeds=1, steps=2, out=out, overrides=tiny_overrides, fid="none",
                         eval_images=16, device="cpu", log=lambda *_: None)
    assert len(again) == len(records) and len(load_results(out)) == len(records)


# ------------------------------------------------------------------------------------------------ verdicts
def _rows(**settings):
    """{setting: [values over seeds]} for one metric -> summarize rows of study 'quantizers'."""
    records = [{"study": "quantizers", "setting": s, "seed": i, "run": f"{s}{i}", "metrics": {"psnr": v}}
               for s, values in settings.items() for i, v in enumerate(values)]
    return summarize(records)


def test_separation_is_the_difference_in_standard_errors():
    rows = {r["setting"]: r for r in _rows(a=[10.0, 11.0, 12.0], b=[7.0, 8.0, 9.0], c=[11.0, 11.0, 11.0])}
    # means 11 and 8, std 1 each, n 3: standard error of the difference sqrt(1/3 + 1/3)
    assert separation(rows["a"], rows["b"]) == pytest.approx(3 / math.sqrt(2 / 3))
    assert separation(rows["a"], rows["c"]) == pytest.approx(0.0)
    one = _rows(a=[1.0], b=[2.0, 3.0])
    assert math.isnan(separation(one[0], one[1]))


def test_verdicts_name_the_winner_and_what_is_resolved():
    rows = _rows(mcq=[23.0, 23.2, 23.4], rvq=[23.1, 23.5, 23.6], fsq=[20.0, 20.1, 20.2])
    (v,) = verdicts(rows, "quantizers")
    assert v["winner"] == "rvq" and v["metric"] == "psnr"
    against = {c["setting"]: c for c in v["comparisons"]}
    assert against["fsq"]["separated"] and not against["mcq"]["separated"]
    text = format_verdicts(rows, "quantizers")
    assert "**PSNR (dB)**: rvq (23.4)" in text
    assert "fsq separated by" in text and "mcq not resolved at this scale" in text
    # lower is better for FID: the winner is the smallest
    fid = summarize([{"study": "quantizers", "setting": s, "seed": i, "run": "x", "metrics": {"fid_proxy": v}}
                     for s, vals in {"a": [50.0, 51.0], "b": [40.0, 41.0]}.items() for i, v in enumerate(vals)])
    assert verdicts(fid, "quantizers")[0]["winner"] == "b"


def test_correlations_join_the_records_of_one_cell_and_give_an_interval():
    import numpy as np

    pairs = [(0.2, 20.0), (0.4, 21.0), (0.6, 22.1), (0.8, 22.9), (1.0, 24.0)]
    records = []
    for i, (usage, psnr) in enumerate(pairs):
        records.append({"study": "quantizers", "setting": f"s{i}", "seed": 0, "metrics": {"codebook_usage": usage}})
        records.append({"study": "quantizers", "setting": f"s{i}", "seed": 0, "metrics": {"psnr": psnr}})
    c = correlations(records, "quantizers", "codebook_usage", "psnr")
    r = float(np.corrcoef(*zip(*pairs))[0, 1])
    assert c["n"] == 5 and c["r"] == pytest.approx(r, rel=1e-9) and c["spearman"] == pytest.approx(1.0)
    # Fisher's interval: tanh(atanh r -+ 1.96 / sqrt(n - 3))
    assert c["low"] == pytest.approx(math.tanh(math.atanh(r) - 1.96 / math.sqrt(2)))
    assert c["high"] == pytest.approx(math.tanh(math.atanh(r) + 1.96 / math.sqrt(2)))
    unrelated = iter([21.0, 21.2, 20.9, 21.1, 21.0])      # PSNR that does not move with usage
    flat = [dict(r, metrics={"psnr": next(unrelated)}) if "psnr" in r["metrics"] else r for r in records]
    text = format_correlations(flat, "quantizers", predictors=("codebook_usage",), downstream=("psnr",))
    assert "| codebook_usage | PSNR (dB) | 5 |" in text and "not resolved" in text


def test_report_of_a_three_seed_study_has_verdicts_and_correlations(tmp_path):
    records = []
    for s, base in (("mcq", 23.0), ("fsq", 20.0), ("rvq", 23.3)):
        for seed in range(3):
            records.append({"study": "quantizers", "setting": s, "seed": seed, "run": f"{s}{seed}",
                            "metrics": {"psnr": base + 0.1 * seed, "codebook_usage": base / 25 + 0.01 * seed}})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = report(tmp_path)
    assert "#### quantizers: verdicts" in text and "Pearson r" in text
    assert (tmp_path / "quantizers_usage.png").stat().st_size > 1000
