#!/usr/bin/env bash
# Builds the emulated CUDA driver, cuBLAS and NCCL of tests/cuda-emu, with
# every kernel of kernels/*.cu compiled for the CPU, into target/cuda-emu/:
# one library, libcuda.so.1, that libcuda.so, libcublas.so and libnccl.so
# name. A test binary started with LD_LIBRARY_PATH=target/cuda-emu sees one
# emulated GPU (SHARDLINE_EMU_GPUS for more) and runs the CUDA backend on it.
# Needs g++ and the CUDA driver header cuda.h, which the pip package
# nvidia-cuda-runtime ships (SHARDLINE_CUDA_INCLUDE, as for NVRTC).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out="$root/target/cuda-emu"
mkdir -p "$out/gen"

cuda_h=""
for dir in ${SHARDLINE_CUDA_INCLUDE//:/ } ${CUDA_HOME:+$CUDA_HOME/include} /usr/local/cuda/include; do
    if [ -f "$dir/cuda.h" ]; then
        cuda_h=$dir
        break
    fi
done
if [ -z "$cuda_h" ]; then
    echo "cuda.h not found: set SHARDLINE_CUDA_INCLUDE to a CUDA include folder (pip nvidia-cuda-runtime has one)" >&2
    exit 1
fi

# A misaligned vector load faults on a GPU: here too (UBSan's alignment check).
flags=(-std=c++17 -O2 -g -fPIC -fvisibility=hidden -fno-strict-aliasing -Wall -Wno-unknown-pragmas -Wno-unused-function -Wno-sign-compare
    -fsanitize=alignment -fno-sanitize-recover=alignment)
objects=()
for cu in "$root"/kernels/*.cu; do
    name=$(basename "$cu" .cu)
    gen="$out/gen/kernel_$name.cpp"
    {
        echo '#include "runtime.h"'
        cat "$root/kernels/common.cuh"
        # Dynamic shared memory is the block's buffer in the emulator.
        sed -E 's/extern __shared__ (.+) ([A-Za-z_][A-Za-z0-9_]*)\[\];/\1* \2 = reinterpret_cast<\1*>(emu::dynamic_shared());/' "$cu"
        # The entry points the CUDA backend loads (src/backend/cuda/kernels.rs).
        python3 - "$root/src/backend/cuda/kernels.rs" "$name.cu" <<'EOF'
import re, sys
for file, names in re.findall(r'kernel!\(\s*"([^"]+)",\s*\[([^\]]*)\]', open(sys.argv[1]).read()):
    if file == sys.argv[2]:
        print("".join(f"EMU_REGISTER({n})\n" for n in re.findall(r'"([^"]+)"', names)), end="")
EOF
    } >"$gen"
    g++ "${flags[@]}" -I"$here/include" -I"$here" -I"$root/kernels" -include "$here/emu.h" -c "$gen" -o "$out/gen/kernel_$name.o" &
    objects+=("$out/gen/kernel_$name.o")
done
for src in threads driver memory graphs cublas nccl; do
    g++ "${flags[@]}" -I"$cuda_h" -I"$here" -c "$here/$src.cpp" -o "$out/gen/$src.o" &
    objects+=("$out/gen/$src.o")
done
for job in $(jobs -p); do
    wait "$job"
done
g++ -shared -fsanitize=alignment -o "$out/libcuda.so.1" "${objects[@]}" -lpthread
for name in libcuda.so libcublas.so libnccl.so; do
    ln -sf libcuda.so.1 "$out/$name"
done
echo "built $out/libcuda.so.1 ($(ls "$root"/kernels/*.cu | wc -l) kernel files)"
