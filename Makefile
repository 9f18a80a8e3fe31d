# Two commands: `make lab` (set up, then open the notebooks) and `make test` (set up, then run every test).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
EXTRAS  := notebook,test,fid,webdataset
# `make lab` installs only what the notebooks need (no test, benchmark, FID or webdataset packages).
LAB_STAMP  := $(VENV)/.installed-lab
LAB_EXTRAS := notebook
PORT    ?= 8888

.PHONY: venv test lab lab-times data clean bench checkpoint generator mllm docs-notebooks quantizer-study

venv: $(STAMP)

# Re-running is a no-op unless the project's dependency files changed. pip prints what it downloads and installs
# (a silent multi-minute install looks hung); everything goes through constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	@echo "==> setting up $(VENV) with unitok[$(EXTRAS)] (the first time takes a few minutes)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e ".[$(EXTRAS)]"
	-@$(MAKE) --no-print-directory data
	touch $(STAMP) $(LAB_STAMP)

# The notebooks' set-up: the library and the notebook extra only (a full `make venv` also satisfies it).
$(LAB_STAMP): pyproject.toml constraints.txt
	@echo "==> setting up $(VENV) for the notebooks with unitok[$(LAB_EXTRAS)] (the first time: up to about two minutes)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e ".[$(LAB_EXTRAS)]"
	-@$(MAKE) --no-print-directory data
	touch $(LAB_STAMP)

# Fashion-MNIST from Debian when we may install packages (root); otherwise torchvision downloads it on first use.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
		echo "note: could not install dataset-fashion-mnist; unitok will use torchvision's download instead"; \
	fi

# One pytest worker per core (pytest-xdist; a test file stays on one worker): the tests run one torch thread each.
test: venv
	$(BIN)/python -m pytest -q -n auto --dist loadfile --durations=15 tests

# JupyterLab's settings for the lab: no news pop-up over the outputs, no update check (JupyterLab reads
# <venv>/share/jupyter/lab/settings/overrides.json as the defaults; a user's own settings still win).
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.json
$(LAB_SETTINGS): $(LAB_STAMP)
	mkdir -p $(dir $@)
	printf '%s\n' '{"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": false}}' > $@

# JupyterLab on 127.0.0.1 with a token (JUPYTER_TOKEN, or a fresh random one printed in the URL below).
lab: $(LAB_STAMP) $(LAB_SETTINGS)
	@token="$${JUPYTER_TOKEN:-$$($(BIN)/python -c 'import secrets; print(secrets.token_hex(16))')}"; \
	echo "==> open http://127.0.0.1:$(PORT)/lab/tree/00_quickstart.ipynb?token=$$token"; \
	exec $(BIN)/jupyter lab --no-browser --ip=127.0.0.1 --port=$(PORT) $(if $(filter 0,$(shell id -u)),--allow-root) \
		--ServerApp.root_dir=notebooks --IdentityProvider.token="$$token" $(CURDIR)/notebooks/00_quickstart.ipynb

# Pre-run copies of the notebooks (outputs kept) in docs/notebooks/, for a class that reads instead of running.
# Runs the real notebooks in classroom mode, one after another (the run times land in docs/notebooks/runs.jsonl).
# Another set: make docs-notebooks DOCS_NOTEBOOKS="00_quickstart 05_zero_shot_understanding"
DOCS_NOTEBOOKS ?= 02_codebook_utilization 04_token_embeddings
# Measure every notebook's classroom run (fresh kernel, top to bottom) and write the times, scaled to 192 GFLOP/s,
# into the README's and the notebooks' tables (docs/notebooks/classroom_times.json keeps the record). Some:
# make lab-times LAB_TIMES="02_codebook_utilization 07_generation"
LAB_TIMES ?=
lab-times: $(LAB_STAMP)
	$(BIN)/python -m unitok_widgets.lab_times $(LAB_TIMES)

docs-notebooks: $(LAB_STAMP)
	$(BIN)/python -c 'import sys; from unitok_widgets.lab import _main; _main(sys.argv[1:])' \
		--mode classroom --out docs/notebooks $(DOCS_NOTEBOOKS:%=notebooks/%.ipynb)

bench: venv
	$(BIN)/python benchmarks/quantizer.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/generator.py
	$(BIN)/python benchmarks/mllm.py

# Re-create the bundled tiny checkpoint in data/tiny-shapes/ with the CPU recipe: the tiny preset as it is (its
# own steps; docs/cpu_recipe.md). --overwrite moves an earlier runs/tiny-shapes and data/tiny-shapes aside.
checkpoint: venv
	$(BIN)/python -m unitok.cli train --preset tiny --data shapes --out runs/tiny-shapes --overwrite
	$(BIN)/python -m unitok.cli export runs/tiny-shapes data/tiny-shapes --overwrite

# Re-create the bundled generator in data/tiny-generator/ from the bundled tokenizer's codes (the train-generator
# defaults: 3000 steps of batch 32; see data/README.md for its time and scores). Its summary.json is measured at the
# plain setting (CFG 3, temperature 1, no top-k) so runs stay comparable; the folder recommends temperature 0.8,
# top-k 4 and CFG 5 (docs/generation.md), which `unitok generate` uses.
generator: venv
	$(BIN)/python -m unitok.cli train-generator --tokenizer data/tiny-shapes --data shapes \
		--out runs/tiny-generator --overwrite
	$(BIN)/python -m unitok.cli.generator export runs/tiny-generator data/tiny-generator --overwrite \
		--sampling temperature=1 --sampling top_k=4 --sampling cfg_scale=3

# Re-create the bundled unified model in data/tiny-mllm/ (reads and writes images through data/tiny-shapes' tokens;
# the train-mllm defaults: 4500 steps in bf16 on AMX CPUs, about 16 minutes on one core; see data/README.md).
mllm: venv
	OMP_NUM_THREADS=1 $(BIN)/python -m unitok.cli train-mllm --tokenizer data/tiny-shapes --data shapes --out runs/tiny-mllm --overwrite
	$(BIN)/python -m unitok.cli.mllm export runs/tiny-mllm data/tiny-mllm --overwrite

# Re-run the bundled quantizer study into docs/ablations/quantizers/ (5 quantizers x 3 seeds, each with a generator and
# a unified model on its codes: about 100 minutes of wall time on a quiet 2-core CPU; see docs/quantizers.md). The
# runs go to runs/ablate-quantizers (resumable: run it again after a stop); the results, the report and its figures
# (the training curves need the run folders, so the report is made there) are copied.
quantizer-study: venv
	$(BIN)/python -m unitok.cli ablate quantizers --seeds 3 --steps 200 --model-steps 200 --jobs 2 \
		--out runs/ablate-quantizers
	$(BIN)/python -m unitok.cli ablate report runs/ablate-quantizers
	mkdir -p docs/ablations/quantizers
	cd runs/ablate-quantizers && cp results.jsonl ablate.json report.md *.png ../../docs/ablations/quantizers/

clean:
	rm -rf $(VENV) .pytest_cache
