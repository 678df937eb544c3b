#!/usr/bin/env bash
# One-command GPU check (issue 14), from the repository root of a checkout with its venv active:
#
#   bash tests/benchmarks/gpu_check.sh            # about 10 minutes on one H100/H200, no network
#
# 1. Writes ~40 MB of FineWeb-like synthetic text (tests/benchmarks/loader_throughput.py's
#    generator: the speed of a step does not depend on what the text says) and trains nanochat's
#    65,536-token BPE on 30 MB of it, under $GPU_CHECK_DIR (default /tmp/nanochat-gpu-check);
#    both are cached there for the next run.
# 2. tests/benchmarks/train_throughput.py at d12 and d20, bf16 autocast, compiled, one micro-batch
#    of 32 x 2,048 tokens per step (nanochat's device batch), --steps 20 after --warmup 5: tok/s,
#    MFU (against the datasheet peak, and against the fp32 / bf16 matmul peaks measured in the same
#    process), step-time percentiles, torch.cuda.max_memory_allocated, the cold compile's time. d20
#    also runs with nanochat's head in one piece (--loss-head plain) for the memory the chunked
#    head saves (for the plain head, expect tens of GB more or an out-of-memory error).
# 3. The CUDA-marked tests (pytest -m cuda): pinned batches and no host sync inside the micro-step
#    loop, fused AdamW, bf16 by default, the chunked head and batched Muon on the GPU.
#
# Figures land in $GPU_CHECK_DIR/*.json and are summarised at the end.
set -uo pipefail
cd "$(dirname "$0")/../.."
WORK="${GPU_CHECK_DIR:-/tmp/nanochat-gpu-check}"
mkdir -p "$WORK/text"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

if [ ! -s "$WORK/text/corpus.jsonl" ]; then
  PYTHONPATH="tests/benchmarks:${PYTHONPATH:-}" python - "$WORK/text/corpus.jsonl" <<'EOF'
import json, sys
from loader_throughput import english_like_documents
with open(sys.argv[1], "w") as out:
    for doc in english_like_documents(40_000_000, seed=0):
        out.write(json.dumps({"text": doc}) + "\n")
EOF
fi
DATA=(data=local "data.path=$WORK/text" "data.data_dir=$WORK/data" tokenizer.vocab_size=65536 tokenizer.max_chars=30000000)
RUN=(system.dtype=bfloat16 system.compile=true trainer.device_batch_size=32 trainer.total_batch_size=65536)
status=0
bench() {  # name, then benchmark options and overrides
  local name=$1
  shift
  echo "=== $name"
  python tests/benchmarks/train_throughput.py --steps 20 --warmup 5 --json "$WORK/$name.json" "$@" || {
    echo "$name failed (exit code $?)"
    status=1
  }
}
bench d12 -- "${DATA[@]}" "${RUN[@]}" model=d12 optimizer=adamw_muon
bench d20 -- "${DATA[@]}" "${RUN[@]}" model=d20 optimizer=adamw_muon
bench d20_plain_head --loss-head plain -- "${DATA[@]}" "${RUN[@]}" model=d20 optimizer=adamw_muon

echo "=== CUDA-marked tests"
python -m pytest -q -p no:cacheprovider -m cuda tests/ || status=1

echo "=== summary"
python - "$WORK" <<'EOF'
import json, pathlib, sys
for name in ("d12", "d20", "d20_plain_head"):
    path = pathlib.Path(sys.argv[1]) / f"{name}.json"
    if not path.exists():
        print(f"{name:15s} no result")
        continue
    r = json.loads(path.read_text())
    print(
        f"{name:15s} {r['tok_per_sec']:>10,.0f} tok/s  MFU {r['mfu_percent'] or 0:5.1f}% of datasheet bf16, "
        f"{r['mfu_percent_vs_measured']['bfloat16']:5.1f}% of measured bf16 matmul  "
        f"max allocated {r['cuda_max_memory_allocated_mib'] / 1024:6.1f} GiB  "
        f"step p50 {1000 * r['step_s']['p50']:.0f} ms  first step {r['first_step_s']:.0f} s"
    )
EOF
exit $status
