#!/usr/bin/env bash
# GPU check for the NVML source, on a machine with an NVIDIA GPU, the driver and PyTorch
# (x86_64, no network). Usage, from the directory holding the carried `nvml-dump` binary
# (agent/examples/nvml_dump.rs, built elsewhere):
#
#   tests/gpu-check/gpu_check.sh [path/to/nvml-dump]
#
# Starts a PyTorch "runtime" decoding in a loop (small matmuls + sleeps), runs nvml-dump for
# 90 s at 500 ms, starts a second PyTorch process hogging the GPU with large matmuls after
# ~30 s, then checks from the JSON lines that both pids were seen with memory and SM shares
# and that the hog has the larger SM share while both run. Ends within ~2 minutes; prints a
# short report; exit 0 on pass.
set -euo pipefail

DUMP=${1:-./nvml-dump}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
DURATION=90
HOG_AT=30
trap 'kill ${RUNTIME_PID:-} ${HOG_PID:-} 2>/dev/null || true; wait 2>/dev/null || true' EXIT

echo "== gpu-check: $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=index,uuid,name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'

cat >"$WORK/runtime.py" <<'PYEOF'
import os, sys, time, torch
# A decode loop: one small matmul chain per "token", then a pause, like a lightly loaded runtime.
x = torch.randn(64, 4096, device="cuda")
w = torch.randn(4096, 4096, device="cuda")
kv = torch.empty(2 * 1024**3 // 2, dtype=torch.float16, device="cuda")  # 2 GiB "weights/KV"
print(os.getpid(), flush=True)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    for _ in range(8):
        y = x @ w
    torch.cuda.synchronize()
    time.sleep(0.01)
PYEOF

cat >"$WORK/hog.py" <<'PYEOF'
import os, sys, time, torch
a = torch.randn(8192, 8192, device="cuda")
b = torch.randn(8192, 8192, device="cuda")
print(os.getpid(), flush=True)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    for _ in range(4):
        c = a @ b
    torch.cuda.synchronize()
PYEOF

"$DUMP" --period-ms 500 --duration-s "$DURATION" >"$WORK/samples.jsonl" 2>"$WORK/dump.err" &
DUMP_PID=$!
"$PY" "$WORK/runtime.py" $((DURATION - 5)) >"$WORK/runtime.pid" &
RUNTIME_PID=$!
sleep "$HOG_AT"
HOG_START=$(date +%s%N)
"$PY" "$WORK/hog.py" $((DURATION - HOG_AT - 15)) >"$WORK/hog.pid" &
HOG_PID=$!
wait "$DUMP_PID" || { echo "nvml-dump failed:"; cat "$WORK/dump.err"; exit 1; }
wait "$RUNTIME_PID" "$HOG_PID" || true
cat "$WORK/dump.err"

"$PY" - "$WORK/samples.jsonl" "$(head -1 "$WORK/runtime.pid")" "$(head -1 "$WORK/hog.pid")" "$HOG_START" <<'PYEOF'
import json, sys
path, runtime, hog, hog_start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
samples, idents = [], {}
for line in open(path):
    rec = json.loads(line)
    if "sample" in rec:
        samples.append(rec["sample"])
    elif "process" in rec:
        idents[rec["process"]["pid"]] = rec["process"]
def seen(pid, after=0):
    rows = [p for s in samples if s["ts"] >= after for p in s["processes"] if p["pid"] == pid]
    mem = max((p.get("used_memory") or 0 for p in rows), default=0)
    sm = [p["sm_util"] for p in rows if p.get("sm_util") is not None]
    return len(rows), mem, sm
both = [s for s in samples if s["ts"] >= hog_start + 3e9
        and {runtime, hog} <= {p["pid"] for p in s["processes"]}]
def mean_sm(pid):
    v = [p.get("sm_util") or 0 for s in both for p in s["processes"] if p["pid"] == pid]
    return sum(v) / len(v) if v else 0.0
rn, rmem, rsm = seen(runtime)
hn, hmem, hsm = seen(hog, hog_start)
gpu_sm = [g["sm_util"] for s in samples for g in s["gpus"] if g.get("sm_util") is not None]
print(f"samples: {len(samples)}; GPUs: {sorted({g['uuid'] for s in samples for g in s['gpus']})}")
print(f"runtime pid {runtime} ({idents.get(runtime, {}).get('executable')}): in {rn} samples, "
      f"max memory {rmem/2**30:.2f} GiB, SM samples {len(rsm)}")
print(f"hog     pid {hog} ({idents.get(hog, {}).get('executable')}): in {hn} samples, "
      f"max memory {hmem/2**30:.2f} GiB, SM samples {len(hsm)}")
print(f"while both ran ({len(both)} samples): runtime SM {mean_sm(runtime):.1f}%, hog SM {mean_sm(hog):.1f}%; "
      f"GPU SM max {max(gpu_sm, default=0)}%")
checks = {
    "runtime seen with memory": rn > 0 and rmem > 0,
    "hog seen with memory": hn > 0 and hmem > 0,
    "SM shares reported for both": bool(rsm) and bool(hsm),
    "hog has the larger SM share while both run": len(both) > 0 and mean_sm(hog) > mean_sm(runtime),
}
for name, ok in checks.items():
    print(f"  {'PASS' if ok else 'FAIL'}  {name}")
sys.exit(0 if all(checks.values()) else 1)
PYEOF
