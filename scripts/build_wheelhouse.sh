#!/usr/bin/env bash
# Build the wheelhouse of pure-Python packages the GPU image lacks (hydra-core, omegaconf, antlr4, wandb and
# its missing dependencies) for Python 3.12 manylinux x86_64, into the git-ignored folder .whl/.
# Run on the dev machine (it reaches PyPI); scripts/gpu_run.sh installs from it on the GPU machine.
#   bash scripts/build_wheelhouse.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=.whl
mkdir -p "$out"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
# Missing from the GPU image (see shared/guide/gpu.md); everything else it already has. Versions pinned so the
# set stays consistent; --no-deps because the image provides the rest (and must keep its own torch).
pkgs=(hydra-core==1.3.2 omegaconf==2.3.0 wandb==0.31.0 gitpython==3.1.45 gitdb==4.0.12 smmap==5.0.2
      pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2
      sentry-sdk==2.48.0 platformdirs==4.5.1 cwevals==0.0.1b1 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2
      opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2
      opentelemetry-proto==1.45.2 opentelemetry-semantic-conventions==0.66b2 googleapis-common-protos==1.76.0
      opentelemetry-exporter-http-transport==0.66b2 httpcore2==2.16.2 httpx2==2.16.2)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d "$out" "${pkgs[@]}"
# antlr4-python3-runtime 4.9.* (omegaconf's pin) is published only as a source archive: build its wheel here.
if ! ls "$out"/antlr4_python3_runtime-4.9.3-*.whl >/dev/null 2>&1; then
  python3 -m pip wheel -q --no-deps -w "$out" antlr4-python3-runtime==4.9.3
fi
du -sh "$out"
ls "$out"
