# marl: `make sft reward ppo` runs the default pipeline; `make test` runs the tests.
# Everything installs itself into .venv on first use (CPU PyTorch pinned for this machine).

PY      := .venv/bin/python
STAMP   := .venv/.installed
TORCH   ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false
ARGS    ?=

.PHONY: install sft reward ppo compare sweep chat pipeline eval test test-slow lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

sft: $(STAMP)
	.venv/bin/marl sft --config configs/sft.yaml $(ARGS)

reward: $(STAMP)
	.venv/bin/marl reward --config configs/reward.yaml $(ARGS)

ppo: $(STAMP)
	.venv/bin/marl ppo --config configs/ppo.yaml $(ARGS)

compare: $(STAMP)  # PPO, GRPO and RLOO side by side (after `make sft reward`)
	.venv/bin/marl ppo --config configs/compare.yaml $(ARGS)

sweep: $(STAMP)  # 8 policies, successive halving, one run (after `make sft reward`): runs/sweep/population.md
	.venv/bin/marl ppo --config configs/sweep.yaml $(ARGS)

chat: $(STAMP)  # the instruct-style default: sft -> reward -> ppo on conversations (configs/chat/)
	.venv/bin/marl sft --config configs/chat/sft.yaml $(ARGS)
	.venv/bin/marl reward --config configs/chat/reward.yaml $(ARGS)
	.venv/bin/marl ppo --config configs/chat/ppo.yaml $(ARGS)

pipeline: sft reward ppo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) -m bench.run_all $(ARGS)

gpu-check:  # ARGS=--prepare here, ARGS=--dry-run to try it, no ARGS on the GPU machine (needs no .venv)
	bench/gpu_check.sh $(ARGS)

lint: $(STAMP)
	.venv/bin/ruff check marl pipelines tests bench
	$(PY) -m tests.import_graph

clean:
	rm -rf runs .pytest_cache
