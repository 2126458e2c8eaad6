# make run | test | format | test-slow | test-other-dtype | test-all | bench | bench-quick | bench-kernels | bench-peer | lab | stop-kernels | screenshots | serve | slides | bundle | notebooks | run-all | setup | standin | clean
PYTHON ?= python3
TORCH_INDEX ?=
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

HOST   ?= 127.0.0.1
PORT   ?= 8000

# Tests run in TEST_WORKERS processes (pytest-xdist), one notebook or test file each at a time (nbval runs
# a notebook's cells in order in one kernel; each exercise answer is a unit of its own), one torch thread each
# so that they do not fight over the cores. Each worker may hold a 2.6 GiB model.
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

.PHONY: format setup standin run run-all test test-slow test-other-dtype test-all bench bench-quick bench-kernels bench-peer lab stop-kernels screenshots notebooks serve slides bundle clean

setup: $(STAMP)

# The installed packages' bytecode, compiled in parallel (as pip would, which skips files that do not compile).
COMPILE := import compileall, sysconfig; compileall.compile_dir(sysconfig.get_paths()['purelib'], quiet=2, workers=0)

# The venv is (re)built when requirements.txt changes. helpers/ is put on the venv's path with a
# .pth file, so notebooks and tests import it from anywhere.
$(STAMP): requirements.txt requirements-standin.txt
	@echo "== installing pinned dependencies into $(VENV) (a few minutes the first time)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar on --upgrade pip
	@# TORCH_INDEX=<a PyTorch wheel index> takes the ROCm or CUDA build of torch instead of the pinned CPU one
	@# --no-compile: pip compiles bytecode one file at a time; COMPILE does it once, on every core, at the end
	if [ -n "$(TORCH_INDEX)" ]; then \
	    $(PY) -m pip install --progress-bar on --no-compile torch --index-url "$(TORCH_INDEX)" && \
	    grep -v '^torch==' requirements.txt > $(VENV)/requirements-without-torch.txt && \
	    $(PY) -m pip install --progress-bar on --no-compile -r $(VENV)/requirements-without-torch.txt; \
	else \
	    $(PY) -m pip install --progress-bar on --no-compile -r requirements.txt; \
	fi
	$(PY) -m pip install --progress-bar on --no-compile --no-deps -r requirements-standin.txt
	$(PY) -c "$(COMPILE)"
	$(PY) -c "import sysconfig; open(sysconfig.get_paths()['purelib'] + '/mixtral_notebooks.pth', 'w').write('$(CURDIR)\n')"
	touch $(STAMP)

standin: setup
	@echo "== checking the stand-in model (built once, about a minute)"
	$(PY) -m workshop standin --verify

# The blog's walkthrough (00-05), headless: build/*.ipynb and build/*.html, each task's answer printed.
run: standin
	@echo "== running the blog's walkthrough (00-05) headless: build/*.ipynb and build/*.html"
	$(PY) -m workshop walkthrough

# Every notebook, ours (06-11) too.
run-all: standin
	$(PY) -m workshop walkthrough --all

# The tests come in two parts, both in TEST_WORKERS processes (the longest files start first, tests/conftest.py).
# make test: the unit tests, nbval re-executing the blog's walkthrough (00-05), the browser test, the walkthrough on a
# hub-shaped checkpoint and the exercise answers of 00-05. make test-slow: everything marked `slow`: nbval over our
# notebooks (06-11), their exercise answers, the offline bundle installed with the network cut and the bench's quick
# run (benchmarks/bench.py --quick).
# CI runs both, then the dtype-sensitive tests in the dtype this machine did not pick (make test-all). Times: README.md.
test: standin
	$(PYTEST) -m "not slow"

test-slow: standin
	$(PYTEST) -m slow

# The dtype-sensitive tests again, in the CPU dtype this machine did not pick (it measures which decodes faster, with
# the tests' one thread), so that neither choice hides a failure: MIXTRAL_DTYPE=float32 or bfloat16.
test-other-dtype: standin
	@echo "== models load in $$(OMP_NUM_THREADS=1 $(PY) -m workshop dtype) here; the numerics tests again in $$(OMP_NUM_THREADS=1 $(PY) -m workshop dtype --other)"
	MIXTRAL_DTYPE=$$(OMP_NUM_THREADS=1 $(PY) -m workshop dtype --other) $(PYTEST) -m numerics

# What CI runs: every test, then the dtype-sensitive tests in the dtype this machine did not pick.
test-all: test test-slow test-other-dtype

# The one formatter of all Python here (ruff.toml); make test checks that nothing is left unformatted.
format: setup
	$(PY) -m ruff format .

# Decode speed per configuration against this machine's bandwidth ceiling: build/bench.{json,md,png}.
bench: standin
	$(PY) benchmarks/bench.py

bench-quick: standin
	$(PY) benchmarks/bench.py --quick

# Every candidate kernel at decode shapes, on buffers larger than the caches: benchmarks/results/<date>-kernels-<cpu>.md
# (about 10 minutes on 2 cores: the compiled candidates compile for minutes each, in processes of their own).
bench-kernels: setup
	$(PY) benchmarks/kernel_bench.py

# The peer, not in CI: llama.cpp built from PyPI's llama-cpp-python source (about 6 minutes on 2 cores, once), the
# stand-in written as GGUF at F32, BF16, Q8_0 and Q4_0, and llama.cpp's decode speed beside the bytes each token reads.
bench-peer: standin
	bash benchmarks/peer/build.sh
	$(PY) benchmarks/peer/peer_bench.py --check
	$(PY) benchmarks/peer/peer_bench.py

lab: standin
	$(VENV)/bin/jupyter lab notebooks

# Photograph each notebook's widget after a run (JupyterLab + Chromium) into docs/images/, for static readers.
screenshots: standin
	$(PY) -m workshop screenshots

# Shut down every notebook kernel of the running Jupyter servers: each kernel holds its own model in memory.
stop-kernels:
	$(PY) -m workshop stop-kernels

# One model for the room: transformers' OpenAI-compatible server with the stand-in and continuous batching,
# behind helpers/room_server.py. HOST=0.0.0.0 lets every machine that reaches the port in (HOST=<an interface's
# address> only that network); MIXTRAL_API_KEY=<a secret> in the environment (not on make's command line, which `ps` shows) requires a key; MIXTRAL_MAX_NEW_TOKENS=<n> cuts longer
# answers; ONE_AT_A_TIME=1 serves one request at a time. It prints the address and the lines to give the room.
serve: standin
	$(PY) -m workshop serve $(HOST) $(PORT) $(if $(ONE_AT_A_TIME),--one-at-a-time)

# reveal.js decks of the task notebooks (prompt, knobs, the stand-in's answer): build/slides/*.slides.html
slides: setup
	$(PY) -m workshop slides

# Everything a room without Wi-Fi needs: wheels, the project, slides, install.sh -> build/bundle/
bundle: setup
	$(PY) -m workshop bundle

# Re-execute the notebooks and store their outputs (the stand-in's) in notebooks/.
notebooks: standin
	$(PY) -m workshop walkthrough --all --inplace

clean:
	rm -rf build .pytest_cache
