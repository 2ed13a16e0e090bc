#!/usr/bin/env bash
# Train CLIP4Clip on MSVD (multi-sentence test) with the original README's hyper-parameters.
# TUNING=unipt (the default, as the UniPT fork's script): CLIP stays frozen and only UniPT's small parallel network
# trains, into ckpts/unipt_msvd. TUNING=full: the original paper's full fine-tuning, into ckpts/full_msvd.
# Extra arguments are passed through and win over the ones below, e.g.
#   ./train_msvd_tuning.sh --epochs 1 --precision bf16
#   TUNING=full ./train_msvd_tuning.sh
# On one GPU (the same global batch of 128; if it does not fit, add --gradient_accumulation_steps 4):
#   GPUS=1 ./train_msvd_tuning.sh
# Videos: preprocess/compress_video.py's output in $DATA_PATH/Compress_Videos when it is there, else the archive's
# videos in $DATA_PATH/MSVD_Videos (the layout of README's Data section); VIDEO_DIR=... picks another folder.
set -euo pipefail

DATA_PATH=${DATA_PATH:-datasets/MSVD}        # train/val/test_list.txt, raw-captions.pkl, and the videos folder
GPUS=${GPUS:-4}                              # processes on this node, one per GPU; --batch_size is split over them
SIM_ENC=${SIM_ENC:-meanP}                    # meanP | seqLSTM | seqTransf | tightTransf
CLIP_NAME=${CLIP_NAME:-ViT-B/32}             # ViT-B/32 | ViT-B/16 (modules/ViT-B-*.pt) or a weights file
TUNING=${TUNING:-unipt}                      # unipt | full (tightTransf needs full)
SAVE_NAME=${SAVE_NAME:-${TUNING}_msvd}
OUTPUT_DIR=${OUTPUT_DIR:-ckpts/${SAVE_NAME}}
MASTER_PORT=${MASTER_PORT:-9988}

cd "$(dirname "$0")"  # relative paths are the checkout's
if [[ -z "${VIDEO_DIR:-}" ]]; then
  VIDEO_DIR=${DATA_PATH}/Compress_Videos
  [[ -d "${VIDEO_DIR}" ]] || VIDEO_DIR=${DATA_PATH}/MSVD_Videos
fi
if [[ ! -d "${VIDEO_DIR}" ]]; then
  echo "$(basename "$0"): error: no video folder ${VIDEO_DIR} (expected ${DATA_PATH}/Compress_Videos or" \
    "${DATA_PATH}/MSVD_Videos; set DATA_PATH or VIDEO_DIR)" >&2
  exit 2
fi

torchrun --nproc_per_node="${GPUS}" --master_port="${MASTER_PORT}" \
  main_task_retrieval.py --do_train --num_thread_reader=4 \
  --epochs=5 --batch_size=128 --n_display=50 \
  --data_path "${DATA_PATH}" \
  --features_path "${VIDEO_DIR}" \
  --output_dir "${OUTPUT_DIR}" \
  --lr 1e-4 --max_words 32 --max_frames 12 --batch_size_val 16 \
  --datatype msvd \
  --feature_framerate 1 --coef_lr 1e-3 \
  --freeze_layer_num 0 --slice_framepos 2 \
  --loose_type --linear_patch 2d --sim_header "${SIM_ENC}" --tuning "${TUNING}" \
  --pretrained_clip_name "${CLIP_NAME}" \
  "$@"
