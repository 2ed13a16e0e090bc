#!/usr/bin/env bash
# First run of CLIP4Clip, on CPU, with nothing downloaded but the Python requirements:
#   1. install requirements.txt (a no-op when already satisfied),
#   2. write the synthetic data set (preprocess/make_synthetic_dataset.py) into $OUT,
#   3. stage 1, standing in for CLIP's pre-training: train CLIP4Clip meanP from the tiny random CLIP (cached in $OUT,
#      shared by all heads),
#   4. stage 2: fine-tune CLIP4Clip with the chosen head from the stage-1 checkpoint, evaluating every epoch,
#   5. evaluate the last checkpoint on the order-dependent test captions, and print the metric table.
#
#   bash demo.sh                          # meanP head, about 6 minutes on 2 cores
#   SIM_HEADER=seqTransf bash demo.sh     # the temporal head (about 3 more minutes: stage 1 is reused)
#   TUNING=unipt bash demo.sh             # stage 2 freezes the stage-1 CLIP and trains UniPT's adapters
#   EPOCHS=2 OUT=/tmp/demo bash demo.sh   # settings below are environment variables
#   bash demo.sh --lr 1e-3                # extra arguments go to stage 2's main_task_retrieval.py (the last one wins)
#   PRETRAIN_SEED=1 TRAIN_SEED=1 bash demo.sh   # other seeds for both stages (bench/demo_seeds.py sweeps several)
#
# The hyper-parameters are not the paper's: the tiny CLIP is random, so it has to learn from scratch at a much
# larger learning rate (docs/demo.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON="${PYTHON:-python3}"
SIM_HEADER="${SIM_HEADER:-meanP}"      # meanP, seqLSTM, seqTransf or tightTransf
TUNING="${TUNING:-full}"               # stage 2: full (fine-tune CLIP) or unipt (frozen CLIP + UniPT adapters)
PRETRAIN_EPOCHS="${PRETRAIN_EPOCHS:-18}"  # stage 1 (meanP from the random CLIP)
EPOCHS="${EPOCHS:-10}"                    # stage 2 (the chosen head, from stage 1)
NUM_TRAIN="${NUM_TRAIN:-1000}"         # training videos (the test videos do not depend on it)
NUM_TEST="${NUM_TEST:-100}"            # test videos, half of them in order-reversed twin pairs
SEED="${SEED:-0}"                      # data set seed
PRETRAIN_SEED="${PRETRAIN_SEED:-42}"   # stage 1's --seed
TRAIN_SEED="${TRAIN_SEED:-42}"         # stage 2's --seed
OUT="${OUT:-demo_output}"              # data, checkpoints, logs and metrics (git-ignored)
INSTALL="${INSTALL:-1}"                # 0: do not touch the Python packages

# --sim_header, --tuning, --epochs and --output_dir among the extra arguments win over the variables (they name the
# run folder and the checkpoint evaluated last).
prev=
RUN=
for arg in "$@"; do
    case "$prev" in
        --sim_header) SIM_HEADER="$arg" ;; --tuning) TUNING="$arg" ;; --epochs) EPOCHS="$arg" ;;
        --output_dir) RUN="$arg" ;;
    esac
    case "$arg" in
        --sim_header=*) SIM_HEADER="${arg#*=}" ;; --tuning=*) TUNING="${arg#*=}" ;; --epochs=*) EPOCHS="${arg#*=}" ;;
        --output_dir=*) RUN="${arg#*=}" ;;
    esac
    prev="$arg"
done

if [ "$INSTALL" = 1 ]; then
    echo "== installing requirements.txt"
    PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install -q --disable-pip-version-check -r requirements.txt
fi

DATA="$OUT/data_seed${SEED}_train${NUM_TRAIN}_test${NUM_TEST}"
if [ ! -f "$DATA/synthetic_meta.json" ]; then  # written last, so its presence means the set is complete
    echo "== writing the synthetic data set to $DATA"
    "$PYTHON" preprocess/make_synthetic_dataset.py --output_dir "$DATA" --datasets msrvtt --seed "$SEED" \
        --num_train "$NUM_TRAIN" --num_test "$NUM_TEST" > /dev/null
fi
MSRVTT="$DATA/msrvtt"

# What every command shares (--loose_type is ignored by tightTransf, as in the original); the head is added per
# command.
COMMON=(--datatype msrvtt --features_path "$MSRVTT/videos" --frame_cache "$OUT/frame_cache" --num_thread_reader 1
        --pretrained_clip_name tiny-random-ViT/16 --cross_num_hidden_layers 2 --max_words 20 --max_frames 4
        --feature_framerate 1 --slice_framepos 2 --batch_size_val 100 --loose_type)
TRAIN=(--do_train --train_csv "$MSRVTT/MSRVTT_train.9k.csv" --val_csv "$MSRVTT/MSRVTT_JSFUSION_test.csv"
       --data_path "$MSRVTT/MSRVTT_data.json" --freeze_layer_num 0 --linear_patch 2d --batch_size 16 --n_display 50)
HEAD=(--sim_header "$SIM_HEADER" --tuning "$TUNING")

# Keep only the last epoch's model (the driver saves model and optimizer every epoch, about 180 MB each).
keep_last() {
    local dir=$1 last=$(($2 - 1)) e
    for ((e = 0; e < last; e++)); do rm -f "$dir/pytorch_model.bin.$e" "$dir/pytorch_opt.bin.$e"; done
}

PRE="$OUT/pretrain_seed${SEED}_train${NUM_TRAIN}_test${NUM_TEST}_epochs${PRETRAIN_EPOCHS}"
[ "$PRETRAIN_SEED" = 42 ] || PRE+="_pretrainseed${PRETRAIN_SEED}"  # the default keeps its old folder name
PRE_MODEL="$PRE/pytorch_model.bin.$((PRETRAIN_EPOCHS - 1))"
if [ -f "$PRE_MODEL" ]; then  # checkpoints are written atomically, so the last epoch's file means stage 1 finished
    echo "== stage 1: reusing $PRE_MODEL"
else
    echo "== stage 1: training CLIP4Clip meanP from the tiny random CLIP ($PRETRAIN_EPOCHS epochs) into $PRE"
    "$PYTHON" main_task_retrieval.py "${TRAIN[@]}" "${COMMON[@]}" --sim_header meanP \
        --epochs "$PRETRAIN_EPOCHS" --lr 5e-4 --coef_lr 4 --seed "$PRETRAIN_SEED" --output_dir "$PRE"
    keep_last "$PRE" "$PRETRAIN_EPOCHS"
    rm -f "$PRE"/pytorch_opt.bin.*  # stage 2 starts a fresh optimizer
fi

SUFFIX=
[ "$TUNING" = full ] || SUFFIX="_$TUNING"
RUN="${RUN:-$OUT/run_${SIM_HEADER}${SUFFIX}}"
mkdir -p "$RUN"
rm -f "$RUN"/pytorch_model.bin.* "$RUN"/pytorch_opt.bin.* "$RUN"/metrics_*.json "$RUN"/log.txt
rm -rf "$RUN/order"

echo "== stage 2: fine-tuning CLIP4Clip $SIM_HEADER (tuning $TUNING) from stage 1 ($EPOCHS epochs) into $RUN"
"$PYTHON" main_task_retrieval.py "${TRAIN[@]}" "${COMMON[@]}" "${HEAD[@]}" --init_model "$PRE_MODEL" \
    --epochs "$EPOCHS" --lr 2e-3 --coef_lr 1 --seed "$TRAIN_SEED" --output_dir "$RUN" "$@"

LAST=$((EPOCHS - 1))
keep_last "$RUN" "$EPOCHS"

echo "== evaluating $RUN/pytorch_model.bin.$LAST on the order-dependent test captions"
# The extra arguments come before the checkpoint, split and folder here: those three are this step's own.
# The training split is named too: --qb_norm builds its querybank from the training captions.
SPLITS=(--train_csv "$MSRVTT/MSRVTT_train.9k.csv" --data_path "$MSRVTT/MSRVTT_data.json")
"$PYTHON" main_task_retrieval.py --do_eval "${COMMON[@]}" "${SPLITS[@]}" "${HEAD[@]}" "$@" \
    --val_csv "$MSRVTT/MSRVTT_JSFUSION_test_order.csv" --init_model "$RUN/pytorch_model.bin.$LAST" \
    --output_dir "$RUN/order" > "$RUN/order_eval.log" 2>&1 || { cat "$RUN/order_eval.log"; exit 1; }

# One ready command for evaluating this checkpoint again, with its report (extra flags pass through: --qb_norm).
EVAL=("$PYTHON" main_task_retrieval.py --do_eval "${COMMON[@]}" "${SPLITS[@]}" "${HEAD[@]}" "$@"
      --val_csv "$MSRVTT/MSRVTT_JSFUSION_test.csv" --init_model "$RUN/pytorch_model.bin.$LAST"
      --output_dir "$RUN/eval" --eval_report)
printf '#!/usr/bin/env bash\n# Written by demo.sh: evaluate %s, write %s/eval/eval_report.html\ncd %q\n%s "$@"\n' \
    "$RUN/pytorch_model.bin.$LAST" "$RUN" "$PWD" "$(printf '%q ' "${EVAL[@]}")" > "$RUN/eval.sh"
echo "== evaluate it again, with its report: bash $RUN/eval.sh"

"$PYTHON" preprocess/demo_table.py "$RUN/metrics_epoch$LAST.json" "$RUN/order/metrics_eval.json" --tuning "$TUNING"
