#!/usr/bin/env bash
# Peak memory of a full-size Fashion-MNIST run (60,000 images) with Xception at 299x299,
# stopped with Ctrl-C (SIGINT) after SECONDS seconds: with the feature cache (default) and without,
# at batch 64, then with the cache at batch 32.
#   scripts/memory_299.sh [SECONDS]
set -u
cd "$(dirname "$0")/.."
seconds="${1:-150}"
for setting in auto:64 off:64 auto:32; do
  cache="${setting%%:*}" batch="${setting##*:}"
  out="runs/memory299-${cache}-${batch}-$(date +%Y%m%d-%H%M%S)"
  /usr/bin/time -f "cache=${cache} batch=${batch}: peak RSS %M KB, wall %e s" \
    timeout -s INT "${seconds}" finetune run recipes/xception_fmnist.yaml \
      --set model.backbone.weights=null --set data.image_size=299 --set training.cache="${cache}" \
      --set training.batch_size="${batch}" --out "$out" \
      2>&1 | grep -E "^\[finetune\]|peak RSS|^interrupted|^error" || true
done
