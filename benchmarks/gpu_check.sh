#!/usr/bin/env bash
# The GPU checks of the speed work in one command: the CUDA tests, then the GPU benchmark
# (bench_generate.py --device cuda --random-weights llama-3.2-1b), each under a time limit, with logs and
# the benchmark's JSON in OUT_DIR. Made for a lent GPU machine whose python3 has CUDA PyTorch, Triton,
# transformers, safetensors, tokenizers, jinja2, hypothesis and pytest, and nothing can be downloaded: our
# packages run from this checkout (PYTHONPATH), nothing is installed. At most about 10 minutes (200 s of
# tests, 380 s of benchmark): one device command (600 s at most) holds both.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default: $OUT, else ./gpu-check)
#
# On a machine without CUDA it checks only itself (imports, test collection: the CUDA tests skip) and
# says so; that is how it is tried before a GPU session.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
export PYTHONPATH="$PWD/packages/chat_core/src:$PWD/packages/chat_distributed/src:$PWD/packages/chat_cli/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

"$python" - <<'EOF' 2>&1 | tee "$out/machine.txt"
import platform, torch, chat_core
print("python", platform.python_version(), "| torch", torch.__version__, "| chat_core", chat_core.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"{p.multi_processor_count} SMs", "| CUDA", torch.version.cuda)
else:
    print("no CUDA GPU: the CUDA tests skip and the benchmark is not run")
EOF
has_cuda=$("$python" -c "import torch; print(int(torch.cuda.is_available()))")

# The CUDA tests: Triton compiled for the GPU (TRITON_INTERPRET=0; the CPU suite runs it interpreted),
# CUDA graphs against eager decode, device="cuda" without an index, the int8 kernel. Only the files that hold them: the
# rest of the suite is the CPU's (CI's) and needs packages this machine may lack.
TRITON_INTERPRET=0 timeout 200 "$python" -m pytest -q -rs -p no:cacheprovider \
    tests/test_paged_attention.py tests/test_int8_triton.py -k "gpu or cuda" 2>&1 | tee "$out/cuda-tests.log"
tests_status=${PIPESTATUS[0]}

bench_status=0
if [ "$has_cuda" = 1 ]; then
    timeout 380 "$python" benchmarks/bench_generate.py --device cuda --random-weights llama-3.2-1b \
        --rounds 1 --passes 2 2>&1 | tee "$out/bench.log"
    bench_status=${PIPESTATUS[0]}
    cp benchmarks/results/generate-cuda.json "$out/" 2>/dev/null
fi
echo "gpu_check: CUDA tests exit ${tests_status}, benchmark exit ${bench_status}; logs in ${out}"
[ "$tests_status" = 0 ] && [ "$bench_status" = 0 ]
