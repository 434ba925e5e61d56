# Two commands do all set-up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medsr-installed

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Every tool tries to phone home and the network is closed: telemetry off everywhere.
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export BENTOML_DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export PYTHONUNBUFFERED := 1
# Python writes each module's .pyc the first time a process imports it, so the venv is not compiled up front:
# compiling all 22,000 modules of site-packages took ~75 s of a fresh `make run`, where the pipeline imports
# ~3,200 of them (~14 s to compile on first import, once). Where the environment sets PYTHONDONTWRITEBYTECODE
# every process would recompile what it imports (~5 s each), so make's commands run without it.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: venv run run-pretrained test test-fast bench dag clean serve package schedule mlflow-ui remote push pull

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, by exact version: it takes the CPU build on disk (a range would pull CUDA). No compiling
	# (see PYTHONDONTWRITEBYTECODE above).
	$(PY) -m pip install --quiet --no-compile torch==2.13.0 uv
	# The rest through uv: the same resolution as pip (checked: identical freeze), ~8 s instead of ~3 min;
	# uv does not read pip's config, so it could not find the CPU torch file, hence pip for torch.
	$(VENV)/bin/uv pip install --quiet --python $(PY) -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: venv
	dvc repro
	medsr summary
	medsr report
	medsr registry champions

# The same, with RLFN fine-tuned from its published weights (params.yaml's commented entry switched on):
# `dvc repro` fetches them into pretrained/, or uses files placed there (docs/pretrained.md).
run-pretrained: venv
	medsr enable-pretrained rlfn
	$(MAKE) run

# scripts/test-deps.sh installs Chromium and dcmtk when missing and runs the suite beside a
# throw-away PostgreSQL; .ci/run is `make test` too.
# One pytest process per core (-n auto), each test file on one of them (--dist loadfile: a file's
# module fixtures, e.g. the e2e pipeline, are built once). In-process tests use one torch thread
# (tests/conftest.py), so one process alone left the second core idle: 24:51 vs 14:34 on 2 cores, measured.
PYTEST := bash scripts/test-deps.sh $(PY) -m pytest -q -n auto --dist loadfile
test: venv
	$(PYTEST)

test-fast: venv
	$(PYTEST) -m "not slow"

bench: venv
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_scale.py  # the data stages at NIH size: 200-800 synthetic 1024^2 PNGs (~15 min)
	$(PY) benchmarks/bench_models.py
	$(PY) benchmarks/bench_serving.py
	$(PY) benchmarks/bench_inference_paths.py
	$(PY) benchmarks/bench_orchestration.py
	$(PY) benchmarks/probe_noisy_reference.py  # quality, val only: needs the models of `make run`
	@# published weights (docs/pretrained.md): only where they have been placed in pretrained/ (~70 min of CPU, cached in tmp/)
	@if ls pretrained/rlfn_x2.pth pretrained/rlfn_x4.pth pretrained/span_ch28_x4.pth pretrained/rfdn_x4.pth >/dev/null 2>&1; \
	then $(PY) benchmarks/bench_pretrained.py; \
	else echo "bench_pretrained: skipped, no published weights in pretrained/ (see docs/pretrained.md)"; fi

# Serves the registry's champion (run `make run` first) on 127.0.0.1:3000.
serve: venv
	$(PY) -m bentoml serve serving.service:MedSR --host 127.0.0.1 --port 3000 --arg device=auto

package: venv
	medsr package

dag: venv
	dvc dag

clean:
	rm -rf data metrics/*.json reports

CRON ?= 0 3 * * 0
MLFLOW_PORT ?= 5000

# Serves the retrain flow as a Prefect deployment on that cron (UI on http://127.0.0.1:4200).
schedule: venv
	medsr schedule --cron "$(CRON)"

mlflow-ui: venv
	mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --artifacts-destination $(CURDIR)/mlartifacts \
		--host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

# Share data, models and pipeline outputs through a DVC remote. The default is a folder beside the
# checkout (a network share works the same); S3: DVC_REMOTE=s3://bucket/medsr (pip install "dvc[s3]"),
# SSH: DVC_REMOTE=ssh://host/srv/medsr-dvc (pip install "dvc[ssh]"). `make remote` writes .dvc/config:
# commit it, and a teammate's clone then needs only `make pull` before `dvc repro` (a no-op).
DVC_REMOTE ?= $(abspath $(CURDIR)/../medsr-dvc-remote)

remote: venv
	dvc remote add --default --force shared "$(DVC_REMOTE)"

push: venv
	dvc push

pull: venv
	dvc pull
