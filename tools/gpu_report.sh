#!/usr/bin/env bash
# Everything only a GPU shows, as one command (run on a CUDA machine from the repository root):
#
#   bash tools/gpu_report.sh              # all sections, in this order
#   bash tools/gpu_report.sh budget fit   # only some: tests bench budget fit
#
# tests   the `gpu` marker (AMP bf16, channels_last, torch.compile, dense tasks, auto batch size)
# bench   every tools/bench_*.py (each adds AMP bf16 + channels_last rows and peak memory on CUDA)
# budget  effdense budget for the three tasks over the CUDA scale range (B0..B7, U-Net B0..B7, D0..D7x)
# fit     the auto batch size (--fit-batch) for U-Net B4 (512x1024 crops) and EfficientDet-D3
#
# Output: runs/gpu-report/<section>.log, and budget.json + budget.png per task under runs/gpu-report/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT_DIR:-runs/gpu-report}

sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(tests bench budget fit)
status=0

run() {  # run <section> <command...>: tee the output into the section's log, remember failures
    local section=$1
    shift
    echo "+ $*" | tee -a "$OUT/$section.log"
    "$@" 2>&1 | tee -a "$OUT/$section.log"
    local code=${PIPESTATUS[0]}
    [ "$code" -ne 0 ] && echo "FAILED ($code): $*" | tee -a "$OUT/$section.log" && status=1
}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_report: no CUDA device here')" || exit 2
mkdir -p "$OUT"

for section in "${sections[@]}"; do
    : > "$OUT/$section.log"
    case $section in
    tests)
        run tests "$PY" -m pytest -q -m gpu tests/gpu ;;
    bench)
        for script in bench_backbones bench_train bench_segmentation bench_detection bench_inference; do
            run bench "$PY" "tools/$script.py"
        done
        # issue 22: D0's training step by part, at 128 and 256 px, on the GPU (bf16 as the presets train)
        run bench "$PY" bench/profile_detector_step.py --device cuda --sizes 128 256 --rounds 10
        run bench "$PY" bench/profile_detector_step.py --device cuda --sizes 256 512 --rounds 10 \
            --set train.amp=bf16 --preset configs/detection/efficientdet_d0_custom.yaml ;;
    budget)
        run budget "$PY" -m tasks.cli budget configs/classification/efficientnet_b0_imagenet.yaml \
            --output "$OUT/budget-classification"
        run budget "$PY" -m tasks.cli budget configs/segmentation/unet_efficientnet_cityscapes.yaml \
            --output "$OUT/budget-segmentation"
        run budget "$PY" -m tasks.cli budget configs/detection/efficientdet_d0_coco.yaml \
            --output "$OUT/budget-detection" ;;
    fit)
        run fit "$PY" -m tasks.cli budget configs/segmentation/unet_efficientnet_cityscapes.yaml \
            --scales efficientnet-b4 --fit-batch --output "$OUT/fit-unet-b4"
        run fit "$PY" -m tasks.cli budget configs/detection/efficientdet_d3_coco.yaml \
            --scales efficientdet-d3 --fit-batch --output "$OUT/fit-d3" ;;
    *)
        echo "gpu_report: unknown section '$section' (known: tests bench budget fit)" >&2
        exit 2 ;;
    esac
done
exit $status
