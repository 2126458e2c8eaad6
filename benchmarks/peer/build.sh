#!/usr/bin/env bash
# Builds llama.cpp's llama-bench, llama-simple and llama-quantize (CPU only, Release) from the copy of llama.cpp that
# ships inside PyPI's llama-cpp-python source distribution: PyPI is the one source of code this project may reach.
#
#   bash benchmarks/peer/build.sh          # about 6 minutes on 2 cores, one compile job at a time
#
# Everything lands in build/peer/ (git-ignored): the sdist, its unpacked source, and the build folder whose bin/
# peer_bench.py looks in. It runs under `nice -n 19` with a single compile job so that a benchmark running at the
# same time on this small machine is disturbed as little as possible; set JOBS=2 to build faster on an idle machine.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"  # the llama.cpp it vendors is what we measure: the README names it
JOBS="${JOBS:-1}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="$ROOT/build/peer"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
SRC="$OUT/llama_cpp_python-$VERSION/vendor/llama.cpp"
BUILD="$OUT/llama.cpp-build"

mkdir -p "$OUT"
if [ ! -f "$OUT/llama_cpp_python-$VERSION.tar.gz" ]; then
    # --no-binary :all: asks for the sdist (the wheels hold only a compiled library, no tools)
    nice -n 19 "$PY" -m pip download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$OUT"
fi
[ -d "$SRC" ] || tar -xzf "$OUT/llama_cpp_python-$VERSION.tar.gz" -C "$OUT"

start=$(date +%s)
# GGML_NATIVE: compile for this CPU (AVX2/AVX-512/AMX as it has them), as a user building llama.cpp here would.
# Tests, server, the unified app and OpenSSL are left out: they are not needed and only lengthen the build.
nice -n 19 cmake -S "$SRC" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=ON
nice -n 19 cmake --build "$BUILD" -j "$JOBS" --target llama-bench llama-simple llama-quantize
echo "built llama.cpp from llama-cpp-python $VERSION in $(( $(date +%s) - start )) s: $BUILD/bin"
