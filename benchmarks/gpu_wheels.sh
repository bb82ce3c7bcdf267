#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_suite.sh installs on a GPU machine that cannot reach PyPI.
# Run here (with PyPI access), in the repository root; the wheels land in .whl/ (.gitignore lists it).
# Versions: what the CPU figures in docs/benchmarks.md were measured with (TRL is the `bench` extra's).
set -euo pipefail
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  transformers==5.24.0 trl==1.10.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  gymnasium==1.4.0 farama-notifications==0.0.6 stable-baselines3==2.9.2
ls -la .whl
