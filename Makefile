# flowgraph: the commands a user and CI run. Everything goes through the repo's .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
TORCH  := torch==2.13.0

.PHONY: install test gpu-check demo bench bench-peers lint format docs clean

install: $(STAMP)

# torch first, pinned: a bare `torch` requirement resolved by pip would pull CUDA wheels.
# DS_BUILD_OPS=0: DeepSpeed compiles nothing at install time (its ops are not used on CPUs).
# The optional extras (hf: transformers, tensorboard) are installed so that tests cover them.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[test,hf,tensorboard]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

# The GPU tier, on a machine with CUDA: the CUDA path end to end, one line per check
# (bf16 PPO/GRPO runs, sync, offload, DeepSpeed ZeRO-2, checkpoint resume, generation
# speed), then NCCL transfers and device-memory offload (tests/test_gpu.py).
gpu-check: install
	$(PY) benchmarks/gpu_check.py
	$(PY) -m pytest -q -m gpu -rA tests/test_gpu.py

demo: install
	$(PY) examples/ppo.py

bench: install
	$(PY) benchmarks/run_all.py

# flowgraph against Hugging Face TRL's GRPOTrainer (benchmarks/peers/compare.py), TRL in
# its own venv: torch first, pinned (no CUDA wheels), then benchmarks/peers/requirements.txt.
# ARGS passes options on, e.g. make bench-peers ARGS='--rounds 1 --steps 3'.
PEER_VENV  := benchmarks/peers/.venv
PEER_STAMP := $(PEER_VENV)/.installed-stamp

$(PEER_STAMP): benchmarks/peers/requirements.txt
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install -q $(TORCH)
	$(PEER_VENV)/bin/python -m pip install -q -r benchmarks/peers/requirements.txt
	touch $(PEER_STAMP)

bench-peers: install $(PEER_STAMP)
	$(PY) benchmarks/peers/compare.py $(ARGS)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

format: install
	$(VENV)/bin/ruff format src tests benchmarks examples
	$(VENV)/bin/ruff check --fix src tests benchmarks examples

# Regenerate the config tables of docs/config.md from the pydantic models.
docs: install
	$(PY) -c "import pathlib; from flowgraph.config import reference_markdown as r; \
	p = pathlib.Path('docs/config.md'); mark = '<!-- generated'; text = p.read_text(); \
	head, tail = text.split(mark, 1); comment = tail.split(chr(10), 1)[0]; \
	p.write_text(head + mark + comment + chr(10) + chr(10) + r())"

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
