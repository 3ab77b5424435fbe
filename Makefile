# MambaAlign: `make demo` trains + evaluates on the built-in synthetic dataset, `make test` runs the tests.
PY      ?= python3
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp

# The demo: the tiny preset on the built-in synthetic dataset, on CPU.
DEMO_DIR   ?= runs/demo
DEMO_TRAIN ?= --dataset synthetic --object disc --img_size 128 --epochs 24

.PHONY: install test test-fast demo bench clean-venv

# The virtual environment is (re)built when a requirements file changes.
$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -r requirements.txt -r requirements-dev.txt
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q

test-fast: $(STAMP)
	$(PYTHON) -m pytest -q -m "not slow"

demo: $(STAMP)
	@if [ -d $(DEMO_DIR) ]; then echo "removing the previous demo run in $(DEMO_DIR)"; rm -rf $(DEMO_DIR); fi
	$(PYTHON) train.py $(DEMO_TRAIN) --out_dir $(DEMO_DIR)
	$(PYTHON) eval.py --checkpoint $(DEMO_DIR)/best_checkpoint.pth --out_dir $(DEMO_DIR)/eval --save_vis
	@echo ""
	@echo "summary:  $(DEMO_DIR)/eval/summary.txt  (and summary.json, eval_results.csv)"
	@echo "heatmaps: $(DEMO_DIR)/eval/vis/heatmaps/   overlays: $(DEMO_DIR)/eval/vis/overlays/"

bench: $(STAMP)
	$(PYTHON) bench.py all

clean-venv:
	rm -rf $(VENV)
