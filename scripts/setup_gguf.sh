#!/usr/bin/env bash
# Install what GGUF export needs: llama-cpp-python (quantizer, runtime, OpenAI-compatible server) and llama.cpp's
# HF->GGUF converter, both from ONE llama-cpp-python source distribution, so the converter writes exactly the GGUF
# the runtime reads.
#
#   scripts/setup_gguf.sh [VERSION]        (default 0.3.36; uses $PYTHON or the `python` on PATH)
#   REBUILD=1 scripts/setup_gguf.sh        (rebuild an installed llama-cpp-python of that version, e.g. a native one)
#
# Why the CMake flags: a default build compiles for the build machine's CPU (GGML_NATIVE). On CPUs that advertise
# Intel AMX in a VM or container that does not enable it, the AMX kernels that llama.cpp then uses for quantized
# weights (q8_0, q4_k_m…) die with SIGILL. A portable AVX2 build avoids that and runs on any x86-64 from ~2015.
# --no-cache-dir: pip would otherwise reuse a cached wheel built with other flags.
set -euo pipefail
VERSION="${1:-0.3.36}"
PYTHON="${PYTHON:-python}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==${VERSION}" -d "$WORK"
SDIST="$(ls "$WORK"/llama_cpp_python-*.tar.gz)"
if [ "${REBUILD:-0}" = 1 ] || ! "$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '${VERSION}')" \
    2>/dev/null; then
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON}" \
    "$PYTHON" -m pip install --no-cache-dir "$SDIST"
fi
"$PYTHON" -m pip install "llama-cpp-python[server]==${VERSION}" "gguf>=0.17" "protobuf>=4.21"
"$PYTHON" -m tunesmith setup-gguf --sdist "$SDIST"
