# make run: train the default model (python main.py) in a virtual environment set up on first use.
# make test: the test suite. make bench: the speed benchmark. make reproduce: the README's results.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test bench reproduce clean

$(STAMP): pyproject.toml setup.py constraints.txt src/mnist_vae/fast/_kernels.c
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test,export,browser,tensorboard,sweep]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python main.py $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/mnist-vae bench $(ARGS)

reproduce: $(STAMP)
	$(VENV)/bin/mnist-vae reproduce $(ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info src/mnist_vae/*.so .pytest_cache
