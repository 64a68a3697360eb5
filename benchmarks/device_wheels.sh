#!/usr/bin/env bash
# Builds .whl/ in the repository root: the wheels that the GPU machine's image (Python 3.12, torch 2.11,
# transformers 5.17, peft 0.21, triton 3.6; no network) lacks for benchmarks/throughput.py's anchors and
# library-kernel rows (issue 18): bitsandbytes (QLoRA), liger-kernel, torchao (float8 training), Unsloth and
# what Unsloth imports. No Ray or MLflow: the throughput, profile and loss-parity scripts do not use them.
#
# Usage (from anywhere in the checkout):  bash benchmarks/device_wheels.sh
# Then, on the GPU machine, with `.whl` carried, start the command with the line this script prints last.
#
# Three wheels are repacked without what the device never loads, so that everything fits in the 64 MiB a
# call carries: bitsandbytes without its libraries for CUDA/ROCm versions other than the image's 13.0;
# Unsloth without `studio/` (its web UI, 82 MB unpacked) and `unsloth_cli/`; torchao without its compiled
# extensions (float8 training is Python over torch._scaled_mm; the extensions are for other kernels and are
# tied to one torch build).
#
# Not carried, on purpose:
# - xformers: optional for Unsloth (without it Unsloth uses PyTorch's SDPA, the attention every other row
#   uses), and its wheels are built for one torch release each and are large.
# - diffusers, hf_transfer, sentence-transformers extras: not imported by `import unsloth`,
#   `FastLanguageModel.from_pretrained` on a local Llama checkpoint, or its LoRA.
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
if ! git check-ignore -q .whl/probe.whl; then  # .gitignore lists it; a checkout without that line gets it here
  exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"; echo '/.whl/' >> "$exclude"
fi
rm -rf .whl && mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl "$@"; }

# QLoRA rows (every loop), Liger rows, raylora's torchao float8 row.
dl bitsandbytes==0.50.2 liger-kernel==0.8.5 torchao==0.17.0   # torchao 0.17: the first release for torch 2.11
# Unsloth and the packages `import unsloth` loads that the image does not have (checked by importing it over
# the image's package set with these wheels; the small ones it declares are carried too).
dl unsloth==2026.10.9 unsloth-zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 \
   pydantic==2.14.4 pydantic-core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0 typing-extensions==4.16.0 \
   msgspec==0.23.0 cut-cross-entropy==25.1.1 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 shtab==1.13.0 \
   json5==0.17.3 nest-asyncio==1.6.0 structlog==26.1.0

python3 - .whl/*.whl <<'PY'
import os, re, sys, zipfile
drop = re.compile(
    r"^bitsandbytes/libbitsandbytes_(rocm\d+|cuda(?!130)\d+)\.so$"
    r"|^studio/|^unsloth_cli/"
    r"|^torchao/_C[^/]*\.so$"
)
for src in sys.argv[1:]:
    with zipfile.ZipFile(src) as zin:
        if not any(drop.match(n) for n in zin.namelist()):
            continue
        tmp = src + ".tmp"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                if drop.match(info.filename):
                    continue
                data = zin.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = b"".join(l for l in data.splitlines(True) if not drop.match(l.decode()))
                zout.writestr(info, data)
    os.replace(tmp, src)
PY
du -b .whl/*.whl | sort -n | awk '{printf "%9.2f MiB  %s\n", $1 / 1048576, $2}'
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | awk '/\ttotal$/ {s += $1} END {print s}')
printf 'wheels %.1f MiB + tracked tree %.1f MiB = %.1f MiB of the 64 MiB a call carries (untracked, not ignored files come on top)\n' \
  "$(echo "$wheels / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)" "$(echo "($wheels + $tree) / 1048576" | bc -l)"
echo "take .whl along to the GPU machine and start each command there with:"
echo "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;"
