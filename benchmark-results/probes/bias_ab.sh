#!/usr/bin/env bash
# Probe (2026-12-05): the q/k/v bias added in float32 (layers._add_bias, the new way) against the bias added on the
# product's 16-bit output (before: XLA folds it into cuBLAS's C operand, materialising a [rows, N] broadcast each
# step). Runs bench verbalize (7B, fused, kernel attention, cuBLAS) alternately with each, one process each, twice;
# "before" is made by editing a copy of the package. Usage: [WAYS="float32 epilogue ..."] [REPS=5] bias_ab.sh OUT_DIR
set -euo pipefail
out=${1:?usage: bias_ab.sh OUT_DIR}
before=$(mktemp -d)
cp -r crossmap "$before/crossmap"
sed -i -e 's/qkv = _add_bias(qkv, self.qkv_bias\[...\])/qkv = qkv + self.qkv_bias[...]/' \
  -e 's/q, k, v = _add_bias(q, self.q_bias\[...\]), _add_bias(k, self.k_bias\[...\]), _add_bias(v, self.v_bias\[...\])/q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]/' \
  "$before/crossmap/models/layers.py"
[ "$(grep -c '_add_bias(' "$before/crossmap/models/layers.py")" = 1 ] || { echo "bias_ab.sh: the edit did not apply" >&2; exit 1; }
export XLA_FLAGS=--xla_gpu_enable_triton_gemm=false
n=0
for way in ${WAYS:-float32 epilogue float32 epilogue}; do
  n=$((n + 1))
  root=$PWD; [ "$way" = epilogue ] && root=$before
  # python -m puts the working directory first on the path: each way runs from its own copy
  (cd "$root" && python3 -m crossmap.cli bench verbalize --preset 7b --projections fused --torch-device none \
    --no-logit-error --reps "${REPS:-5}" --out "$out/verbalize-7b-bias-$n-$way.json" 2>&1 | grep "crossmap (" || true)
done
