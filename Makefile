# Two commands: `make lab` (set up, then open the notebooks) and `make test` (set up, then run every test).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
EXTRAS  := notebook,test,fid,webdataset,bench
PORT    ?= 8888

.PHONY: venv test lab data clean bench checkpoint

venv: $(STAMP)

# Re-running is a no-op unless the project's dependency files changed.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	-@$(MAKE) --no-print-directory data
	touch $(STAMP)

# Fashion-MNIST from Debian when we may install packages (root); otherwise torchvision downloads it on first use.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
		echo "note: could not install dataset-fashion-mnist; unitok will use torchvision's download instead"; \
	fi

test: venv
	$(BIN)/python -m pytest -q tests

# JupyterLab on 127.0.0.1 with a token (JUPYTER_TOKEN, or a fresh random one printed in the URL below).
lab: venv
	@token="$${JUPYTER_TOKEN:-$$($(BIN)/python -c 'import secrets; print(secrets.token_hex(16))')}"; \
	echo "==> open http://127.0.0.1:$(PORT)/lab/tree/00_quickstart.ipynb?token=$$token"; \
	exec $(BIN)/jupyter lab --no-browser --ip=127.0.0.1 --port=$(PORT) $(if $(filter 0,$(shell id -u)),--allow-root) \
		--ServerApp.root_dir=notebooks --IdentityProvider.token="$$token" $(CURDIR)/notebooks/00_quickstart.ipynb

bench: venv
	$(BIN)/python benchmarks/quantizer.py
	$(BIN)/python benchmarks/train_throughput.py

# Re-create the bundled tiny checkpoint in data/tiny-shapes/ (a few CPU minutes).
checkpoint: venv
	$(BIN)/python -m unitok.cli train --preset tiny --data shapes --steps 1500 --out runs/tiny-shapes
	$(BIN)/python -m unitok.cli export runs/tiny-shapes data/tiny-shapes

clean:
	rm -rf $(VENV) .pytest_cache
