#!/usr/bin/env bash
# Every benchmark of the project, on the GPU machine, within ~25 minutes; then BENCHMARKS.md is rebuilt.
#
#   bash bench/run_all.sh            # GPU machine: full-size figures
#   SIZE=reduced DEVICE=cpu RESULTS=/tmp/smoke bash bench/run_all.sh
#                                    # a CPU smoke run at reduced size into another folder (figures not comparable)
#
# Each script appends a dated Markdown section (figure, machine, command) to bench/results/<name>.md;
# python -m bench.collect then writes BENCHMARKS.md from those files. Budgets (minutes, approximate on an H100):
#   preprocessing throughput 3, planners 2, pretraining speed + precision sweep 6, segmentation trainer 3,
#   classification throughput + probe/finetune/scratch (3 seeds x 5 folds x 240 steps) ~10, CPU prediction 6,
#   real-knee pretraining curve 4, PACS-export scan 2; label efficiency: run separately (python -m bench.label_efficiency).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SIZE=${SIZE:-full}
DEVICE=${DEVICE:-cuda}
R=${RESULTS:-bench/results}
mkdir -p "$R"
stamp() { printf '\n[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

stamp "preprocessing throughput vs nnUNetv2_plan_and_preprocess"
$PY -m bench.bench_preprocess --cases 16 -np 8 --repeats 2 | tee -a "$R/planning.md"
stamp "plans vs nnU-Net's planners"
$PY -m bench.compare_planners | tee -a "$R/planning.md"
stamp "pretraining vs vanilla nnU-Net training, precision sweep"
$PY -m bench.bench_pretraining --device "$DEVICE" --size "$SIZE" --out "$R/pretraining.md"
stamp "segmentation trainer vs nnUNetTrainer"
$PY -m bench.bench_seg_trainer --device "$DEVICE" --size "$SIZE" --out "$R/segmentation.md"
stamp "segmentation trainer: channels-last vs the default memory format"
$PY -m bench.bench_seg_trainer --device "$DEVICE" --size "$SIZE" --versus contiguous --out "$R/segmentation.md"
stamp "classification throughput and probe / fine-tune / scratch"
$PY -m bench.bench_classification --part both --device "$DEVICE" --size "$SIZE" --out "$R/classification.md"
stamp "predict seg vs nnUNetv2_predict, CPU time per exam (paired); a real knee exam at the default plans size on CPU"
$PY -m bench.bench_predict_cpu --part paired --cases 3 --repeats 3 --tta both --out "$R/prediction.md"
if [ -d ../shared/data ]; then
  $PY -m bench.bench_predict_cpu --part real-knee --threads 2 --out "$R/prediction.md"
fi
stamp "pretraining loss curve on the real knees of ../shared/data"
if [ -d ../shared/data ]; then
  $PY -m bench.pretrain_real_knees --minutes 4 --out "$R/pretraining.md"
else
  echo "skipped: ../shared/data is absent"
fi
stamp "orthodiff scan of a generated PACS export (>= 10,000 files), serial vs process and thread pools"
$PY -m bench.bench_scan --exams 48 --workers 8 --modes serial,process,thread
stamp "noise schedules and forward process: the pure module vs MONAI's DDPMScheduler (on this machine's device: CPU)"
$PY -m bench.bench_noise_schedule --repeats 25
stamp "rebuilding BENCHMARKS.md"
$PY -m bench.collect --results "$R" --out "$( [ "$R" = bench/results ] && echo BENCHMARKS.md || echo "$R/BENCHMARKS.md" )"
stamp "done"
