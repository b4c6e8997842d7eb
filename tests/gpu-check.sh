#!/usr/bin/env bash
# The whole GPU suite and the GPU benchmarks in one go, ending with a short
# table. Where cargo is present it builds first; the lent GPU machine has no
# Rust toolchain, so there the binaries are built beforehand:
#
#   tests/gpu-check.sh --prepare   # here: release binaries, packed into target/gpu-carry
#   tests/gpu-check.sh             # there, with target/gpu-carry carried along
#
# Finds CUDA's libraries (cuBLAS, NVRTC, NCCL) in the pip `nvidia` packages
# or the toolkit, and the headers NVRTC needs (cuda_bf16.h, crt/mma.h): the
# machine's own first, then the CUDA 13.0 ones packed with the binaries.
# Logs go to $OUT when set.
#
# The whole check keeps to GPU_CHECK_SECONDS (default 500, under the lent
# machine's 600 s a call): each part runs under a time limit of its own,
# cut to what is left, and a part with no time left is reported skipped.
# The fast correctness suites run first, then the benchmarks, then the
# slower suites. Each summary row is also appended to summary.txt in the
# log folder as it is made, so a check cut short still returns its rows.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/target/gpu-check
# The binaries packed small enough to travel with the working tree.
PACK=$ROOT/target/gpu-carry/bins.tar.xz
LOGS=${OUT:-$ROOT/target/gpu-check-logs}
# Test binaries the check runs: the fast GPU suites before the
# benchmarks, the serving and slower ones after.
FIRST_SUITES="cuda_ops cuda_sampling cuda_model cuda_graphs nvrtc"
LAST_SUITES="cuda_serve greedy_chat http cli"
SUITES="$FIRST_SUITES $LAST_SUITES"
BUDGET=${GPU_CHECK_SECONDS:-500}

prepare() {
    cargo build --release --bin shardline || exit 1
    local args=()
    for suite in $SUITES; do args+=(--test "$suite"); done
    cargo test --release --no-run --message-format=json "${args[@]}" >target/gpu-check-build.json || exit 1
    rm -rf "$BIN" && mkdir -p "$BIN"
    cp target/release/shardline "$BIN/"
    python3 - "$BIN" target/gpu-check-build.json <<'EOF' || exit 1
import json, shutil, sys
for line in open(sys.argv[2]):
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and "test" in msg["target"]["kind"]:
        shutil.copy(msg["executable"], f"{sys.argv[1]}/{msg['target']['name']}")
EOF
    strip "$BIN"/* 2>/dev/null
    # The CUDA headers the kernels include, for a machine whose own lack some.
    local headers=$ROOT/target/cuda-py/nvidia/cu13/include
    if [[ ! -f $headers/crt/mma.h ]]; then
        python3 -m pip install --quiet --disable-pip-version-check --upgrade --target "$ROOT/target/cuda-py" \
            "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" || exit 1
    fi
    cp -r "$headers" "$BIN/cuda-include"
    mkdir -p "$(dirname "$PACK")" && tar -C "$ROOT/target" -cJf "$PACK" gpu-check || exit 1
    du -sh "$BIN" "$PACK"
}

if [[ "${1:-}" == "--prepare" ]]; then
    prepare
    exit 0
fi
if command -v cargo >/dev/null; then
    prepare || exit 1
elif [[ -f "$PACK" ]]; then
    tar -C "$ROOT/target" -xJf "$PACK" || exit 1
fi
[[ -x "$BIN/shardline" ]] || { echo "no $BIN/shardline: run tests/gpu-check.sh --prepare where cargo is, and carry target/gpu-carry"; exit 1; }

# CUDA libraries: every lib folder of the pip nvidia packages, NCCL under the
# name cudarc opens (libnccl.so), and the header folders: the machine's
# that holds cuda_bf16.h (preferring one that holds crt/mma.h too), then ours.
mkdir -p "$LOGS" /tmp/shardline-libs
NVIDIA=$(python3 -c 'import nvidia, os; print(os.pathsep.join(nvidia.__path__))' 2>/dev/null)
LIBDIRS=$(for d in ${NVIDIA//:/ }; do find "$d" -name 'lib*.so*' -printf '%h\n'; done | sort -u | paste -sd:)
NCCL=$(for d in ${NVIDIA//:/ }; do find "$d" -name 'libnccl.so.2'; done | head -1)
[[ -n "$NCCL" ]] && ln -sf "$NCCL" /tmp/shardline-libs/libnccl.so
export LD_LIBRARY_PATH=/tmp/shardline-libs:$LIBDIRS:${LD_LIBRARY_PATH:-}
HEADERS=$( (for d in ${NVIDIA//:/ }; do find "$d" -name cuda_bf16.h; done; ls /usr/local/cuda/include/cuda_bf16.h 2>/dev/null) | xargs -r -n1 dirname)
HEADER_DIR=$( (for d in $HEADERS; do [[ -f $d/crt/mma.h ]] && echo "$d"; done; echo "$HEADERS") | head -1)
export SHARDLINE_CUDA_INCLUDE=${HEADER_DIR:+$HEADER_DIR:}$BIN/cuda-include
export SHARDLINE_REPO=$ROOT SHARDLINE_BIN=$BIN/shardline SHARDLINE_KERNEL_CACHE=/tmp/shardline-kernels
nvidia-smi -L || true
START=$(date +%s)

ROWS=()
SUMMARY=$LOGS/summary.txt
: >"$SUMMARY"
# Adds summary rows: `row LABEL TEXT`, or lines on stdin with `add_rows`.
row() { add_rows < <(printf '%-34s %s\n' "$1" "$2"); }
add_rows() {
    local line
    while IFS= read -r line; do
        ROWS+=("$line")
        echo "$line" >>"$SUMMARY"
    done
}
# The seconds a part may take: its own limit, or what is left of the budget.
allow() {
    local left=$((BUDGET - ($(date +%s) - START)))
    echo $((left < $1 ? left : $1))
}
# Runs `limited LIMIT LABEL CMD...` under `timeout`; when under 10 s are
# left it says the part was skipped instead and returns 99.
limited() {
    local limit label=$2
    limit=$(allow "$1")
    shift 2
    if ((limit < 10)); then
        row "$label" "SKIPPED: out of time (GPU_CHECK_SECONDS=$BUDGET)"
        return 99
    fi
    timeout "$limit" "$@"
}

suite() {
    local suite=$1 env=() start result summary
    [[ $suite == http ]] && env=(SHARDLINE_DEVICE=cuda)
    start=$(date +%s)
    limited 240 "test $suite" env "${env[@]}" "$BIN/$suite" --test-threads=2 --nocapture >"$LOGS/$suite.log" 2>&1
    case $? in
        0) result="ok" ;;
        99) return ;;
        124) result="TIMED OUT (log: $suite.log)" ;;
        *)
            result="FAILED (log: $suite.log)"
            tail -n 40 "$LOGS/$suite.log"
            ;;
    esac
    summary=$(grep -E '^test result' "$LOGS/$suite.log" | tail -1 | sed -E 's/test result: [a-zA-Z]+\. //; s/; 0 ignored.*//')
    grep -q 'skipped: no CUDA GPU' "$LOGS/$suite.log" && result="SKIPPED: no GPU seen"
    row "test $suite" "$result, $summary, $(($(date +%s) - start)) s"
}

for suite in $FIRST_SUITES; do suite "$suite"; done

# Batch-1 prefill and decode on both shapes, next to transformers, and
# decode again with kernels launched one after another (no programmatic
# dependent launch), for what it gains.
for model in qwen2.5-0.5b qwen2.5-7b; do
    config=configs/models/$model.json
    limited 90 "bench $model" "$BIN/shardline" bench --device cuda --model "$config" --load-format dummy --prompt-len 128 \
        --decode-tokens 64 --repeats 3 --json >"$LOGS/bench-$model.json" 2>"$LOGS/bench-$model.log"
    (($? == 99)) && continue
    limited 60 "bench $model without PDL" env SHARDLINE_NO_PDL=1 "$BIN/shardline" bench --device cuda --model "$config" \
        --load-format dummy --prompt-len 128 --decode-tokens 64 --repeats 2 --json >"$LOGS/bench-$model-no-pdl.json" \
        2>"$LOGS/bench-$model-no-pdl.log"
    limited 90 "HF peer $model" python3 benches/hf_gpu_peer.py --config "$config" --prompt-len 128 --decode-tokens 64 --repeats 3 \
        >"$LOGS/peer-$model.json" 2>"$LOGS/peer-$model.log" || tail -n 20 "$LOGS/peer-$model.log"
    add_rows < <(python3 - "$LOGS/bench-$model.json" "$LOGS/peer-$model.json" "$model" "$LOGS/bench-$model-no-pdl.json" <<'EOF'
import json, sys
def load(path):
    try:
        return json.load(open(path))
    except Exception:
        return {}
ours, peer, model, serial = load(sys.argv[1]), load(sys.argv[2]), sys.argv[3], load(sys.argv[4])
if not ours:
    print(f"{'bench ' + model:<34} FAILED or out of time (see bench-{model}.log)")
    sys.exit()
line = (f"{'bench ' + model:<34} decode {ours['decode_tokens_per_s']:.1f} tok/s = "
        f"{100 * ours['decode_fraction_of_limit']:.0f}% of {ours['decode_bandwidth_limit_tokens_per_s']:.0f} limit "
        f"({ours['memory_bandwidth_gb_per_s']:.0f} GB/s), prefill {ours['prefill_tokens_per_s']:.0f} tok/s")
if ours.get("kernel_launches_per_decode_step") is not None:
    line += f", {ours['kernel_launches_per_decode_step']:.0f} kernels/step"
if ours.get("host_us_per_decode_step") is not None:
    line += f" (host {ours['host_us_per_decode_step']:.0f} µs/step)"
if peer:
    line += (f"; HF decode {peer['decode_tokens_per_s']:.1f} ({ours['decode_tokens_per_s'] / peer['decode_tokens_per_s']:.2f}x), "
             f"prefill {peer['prefill_tokens_per_s']:.0f} ({ours['prefill_tokens_per_s'] / peer['prefill_tokens_per_s']:.2f}x)")
graphs = ours.get("decode_graphs")
if graphs:
    line += (f"; graphs: {graphs['programmatic_edges']} of {graphs['kernel_to_kernel_edges']} kernel edges programmatic, "
             f"{graphs['memory_nodes']} alloc/free nodes")
if serial:
    line += (f"; without PDL {serial['decode_tokens_per_s']:.1f} tok/s "
             f"(PDL {ours['decode_tokens_per_s'] / serial['decode_tokens_per_s']:.2f}x)")
print(line)
EOF
)
done

# Batch 64 through the engine: output tokens/s, and the share of the
# device's time spent idle between steps (timing events on its stream), on
# the shape whose short steps leave the host the least time (the 7B
# throughput run below reports it too): greedy, then shorter with
# Qwen2.5-Instruct's sampling (what serve applies by default; its
# repetition penalty gives each row an adjustment per distinct token).
model=qwen2.5-0.5b
QWEN_SAMPLING="--temperature 0.7 --top-k 20 --top-p 0.8 --repetition-penalty 1.05"
for run in "greedy 90 128" "qwen 45 64"; do
    read -r how limit tokens <<<"$run"
    label="batch 64 $model"
    sampling=()
    if [[ $how == qwen ]]; then
        label+=" qwen-sampling"
        read -ra sampling <<<"$QWEN_SAMPLING"
    fi
    limited "$limit" "$label" "$BIN/shardline" bench --device cuda --model "configs/models/$model.json" --load-format dummy \
        --concurrency 64 --prompt-len 128 --decode-tokens "$tokens" --repeats 1 "${sampling[@]}" --json \
        >"$LOGS/batch64-$model-$how.json" 2>"$LOGS/batch64-$model-$how.log"
    (($? == 99)) && continue
    add_rows < <(python3 - "$LOGS/batch64-$model-$how.json" "$label" "batch64-$model-$how.log" <<'EOF'
import json, sys
label = sys.argv[2]
try:
    report = json.load(open(sys.argv[1]))
except Exception:
    print(f"{label:<34} FAILED or out of time ({sys.argv[3]})")
    sys.exit()
line = f"{label:<34} {report['output_tokens_per_s']:.0f} output tok/s"
if "device_idle_fraction" in report:
    line += f", device idle between steps {100 * report['device_idle_fraction']:.1f}% ({report['device_mean_gap_us']:.0f} µs a gap)"
graphs = report.get("decode_graphs")
if graphs:
    line += f"; {graphs['recorded']} graphs, {graphs['kernel_nodes']} kernel nodes"
held, planned = report.get("gpu_memory_in_use_bytes"), report.get("gpu_memory_predicted_bytes")
if held and planned:
    line += f"; GPU holds {held[0] / 2**30:.2f} GiB, plan {planned / 2**30:.2f} GiB + context"
print(line)
EOF
)
done

# The kernels decode streams memory through, alone, on the 7B shapes, and
# the attention of a 4K-token prompt's prefill.
limited 90 "kernels qwen2.5-7b" "$BIN/shardline" bench --kernels --model configs/models/qwen2.5-7b.json --load-format dummy \
    --context 4096 --json >"$LOGS/kernels.json" 2>"$LOGS/kernels.log"
if (($? != 99)); then
    add_rows < <(python3 - "$LOGS/kernels.json" <<'EOF'
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except Exception:
    print(f"{'kernels qwen2.5-7b':<34} FAILED or out of time (kernels.log)")
    sys.exit()
for k in report["kernels"]:
    if k["kernel"].startswith("prefill"):
        print(f"{'kernel':<34} {k['kernel']}: {k['us']:.1f} µs, {k['tflop_per_s']:.1f} TFLOP/s")
    else:
        print(f"{'kernel':<34} {k['kernel']}: {k['us']:.1f} µs, {k['gb_per_s']:.0f} GB/s = {100 * k['fraction_of_copy_bandwidth']:.0f}% of copy"
              + (f" (launched one by one: {k['us_launched']:.1f} µs)" if k["graphed"] else " (launched one by one: no graph)"))
EOF
)
fi

# Throughput: 256 requests of 128-1024 prompt and output tokens on the 7B
# shape, next to transformers' batched generate on the same workload (it
# starts no batch after 90 s, and reports the requests it finished).
config=configs/models/qwen2.5-7b.json
limited 150 "throughput qwen2.5-7b x256" "$BIN/shardline" bench --device cuda --model "$config" --load-format dummy \
    --requests 256 --json >"$LOGS/throughput.json" 2>"$LOGS/throughput.log"
if (($? != 99)); then
    limited 180 "HF throughput qwen2.5-7b" python3 benches/hf_gpu_peer.py --config "$config" --requests 256 --time-limit 90 \
        >"$LOGS/throughput-peer.json" 2>"$LOGS/throughput-peer.log" || tail -n 20 "$LOGS/throughput-peer.log"
    add_rows < <(python3 - "$LOGS/throughput.json" "$LOGS/throughput-peer.json" <<'EOF'
import json, sys
def load(path):
    try:
        return json.load(open(path))
    except Exception:
        return {}
ours, peer = load(sys.argv[1]), load(sys.argv[2])
line = f"{'throughput qwen2.5-7b x256':<34} "
line += f"{ours['output_tokens_per_s']:.0f} output tok/s" if ours else "FAILED or out of time (throughput.log)"
if peer:
    line += f"; HF batched {peer['output_tokens_per_s']:.0f}"
    if ours:
        line += f" ({ours['output_tokens_per_s'] / peer['output_tokens_per_s']:.2f}x)"
    if peer.get("requests_done", peer["requests"]) < peer["requests"]:
        line += f" (HF on its first {peer['requests_done']} requests)"
else:
    line += "; HF batched FAILED or out of time"
if ours.get("device_idle_fraction") is not None:
    line += f"; device idle between steps {100 * ours['device_idle_fraction']:.1f}%"
print(line)
EOF
)
fi

for suite in $LAST_SUITES; do suite "$suite"; done

echo
echo "== gpu-check summary ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), $(($(date +%s) - START)) s) =="
printf '%s\n' "${ROWS[@]}"
