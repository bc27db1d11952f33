#!/usr/bin/env bash
# Pack the tokenizers of the shipped small models, which share their vocabularies with Qwen2.5-7B and
# Gemma 3, into one small archive (qwen2.5/ and gemma3/) for `crossmap bench paper` on a machine that
# lacks the shipped packages (e.g. a GPU node without network):
#   launch/pack_tokenizers.sh .carry/tokenizers.tar.xz
#   tar -xJf tokenizers.tar.xz -C /tmp/tok && launch/gpu_node.sh bench paper \
#       --source-tokenizer /tmp/tok/qwen2.5 --target-tokenizer /tmp/tok/gemma3 --embedder DIR
set -euo pipefail
out=${1:?usage: launch/pack_tokenizers.sh OUT.tar.xz}
crossmap=(crossmap)
command -v crossmap >/dev/null || crossmap=(python3 -m crossmap.cli)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
declare -A shipped=([qwen2.5]=qwen2.5-coder-0.5b-instruct [gemma3]=gemma-3-270m)
for name in "${!shipped[@]}"; do
  dir=$("${crossmap[@]}" convert "shipped:${shipped[$name]}" | tail -n 1)  # cached after the first time
  mkdir -p "$tmp/$name"
  cp "$dir"/tokenizer* "$tmp/$name/"
  cp "$dir"/chat_template.jinja "$tmp/$name/" 2>/dev/null || true
done
mkdir -p "$(dirname "$out")"
tar -cJf "$out" -C "$tmp" qwen2.5 gemma3
ls -l "$out"
