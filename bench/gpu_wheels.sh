#!/usr/bin/env bash
# The wheels bench/gpu.py needs on the GPU box that its image lacks (Python 3.12, x86-64), into
# .whl/ (git-ignored; carried to the box, 64 MiB at most). The box already has torch, transformers,
# tokenizers, safetensors, numba, httpx, numpy, xxhash, prometheus-client, huggingface-hub, jaxtyping,
# tqdm, matplotlib, pyarrow, fsspec and the rest its KINDS.md lists.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(transformer-lens==4.3.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 zarr==3.1.6 donfig==0.8.1.post1
        numcodecs==0.16.6 google-crc32c==1.9.0 fastapi==0.165.0 fastapi-offline==1.7.7 starlette==1.10.0
        uvicorn==0.54.0 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4
        annotated-types==0.8.0 typing-inspection==0.4.5 sniffio==1.3.1)
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"
du -b .whl/*.whl | sort -n | awk '{printf "%9d %s\n", $1, $2; s += $1} END {printf "%9d in all\n", s}'
