#!/usr/bin/env bash
# Put the served model and SAE on the data volume once; serving pods then read only the volume.
# MODEL_REPO: hub id of the LLaVA checkpoint. SAE_REPO: hub id of a released SAE (optional); without
# it the SAE the train RayJob wrote (TRAINED_SAE) is copied. HF_TOKEN (optional Secret) for gated repos.
set -euo pipefail
: "${MODEL_REPO:?}" "${MODEL_DIR:?}" "${SAE_DIR:?}" "${TRAINED_SAE:?}"
export HF_HUB_OFFLINE=0

if [ -f "$MODEL_DIR/.seeded" ]; then
  echo "model already seeded in $MODEL_DIR"
else
  hf download "$MODEL_REPO" --local-dir "$MODEL_DIR"
  touch "$MODEL_DIR/.seeded"
fi

if [ -f "$SAE_DIR/.seeded" ]; then
  echo "SAE already seeded in $SAE_DIR"
elif [ -n "${SAE_REPO:-}" ]; then
  hf download "$SAE_REPO" --local-dir "$SAE_DIR"
  touch "$SAE_DIR/.seeded"
elif [ -d "$TRAINED_SAE" ]; then
  mkdir -p "$SAE_DIR"
  cp -a "$TRAINED_SAE/." "$SAE_DIR/"
  touch "$SAE_DIR/.seeded"
else
  echo "no SAE: set SAE_REPO in the seed Job, or run the vlm-steer-train RayJob first ($TRAINED_SAE)" >&2
  exit 1
fi
