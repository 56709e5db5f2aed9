#!/usr/bin/env bash
# Build a wheelhouse for an air-gapped GPU host: Python 3.12, manylinux x86_64, torch already installed
# (the lent H100/H200 machines: torch 2.11 + CUDA 13 and most of our runtime dependencies, but no
# DeepSpeed). Only what such a host lacks goes in:
#
#   deepspeed 0.19.8   PyPI ships it as an sdist only; built here into a pure py3-none-any wheel with
#                      DS_BUILD_OPS=0 (every CUDA op stays JIT, and our trainer loads none of them)
#   hjson, pydantic, pydantic-core, annotated-types, typing-inspection
#                      DeepSpeed's dependencies the host lacks (binary ones for cp312 manylinux)
#   typing-extensions  only a fallback: install_offline.sh installs it only when the host's copy is
#                      older than pydantic needs
#   zstandard          megalm's (.zst inputs), cp312 manylinux
#   megalm             this repository, --no-deps (torch, numpy, tokenizers... come from the host)
#
#   bash scripts/wheelhouse.sh [DIR]        # default DIR: wheelhouse/ (gitignored); prints the file list
#   bash scripts/install_offline.sh DIR     # on the host, no network (see that script)
#
# With the device tool, name the wheelhouse in `carry` (it is ignored by git, so it does not travel
# otherwise): carry=["wheelhouse"]. bench/gpu_check.sh installs from it when deepspeed is missing.
# Needs: this repository's .venv (torch, setuptools; see scripts/bootstrap.sh) and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-wheelhouse}
PY=${PYTHON:-.venv/bin/python}
TARGET_PY=3.12
LIMIT_MIB=${WHEELHOUSE_LIMIT_MIB:-40}   # the device tool carries 64 MiB in all, working tree included

# Versions: the ones this repository's tests run with (requirements.txt and DeepSpeed's resolution here).
BINARY=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 zstandard==0.25.0)
DEEPSPEED=deepspeed==0.19.8
# pip matches manylinux tags exactly: name the common ones (the host's glibc is newer than all of them).
PLATFORMS=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 \
         manylinux_2_39_x86_64 manylinux1_x86_64 linux_x86_64; do
  PLATFORMS+=(--platform "$p")
done

"$PY" -c "import torch, setuptools" 2>/dev/null || {
  echo "wheelhouse.sh: $PY needs torch and setuptools to build DeepSpeed's sdist (run scripts/bootstrap.sh)" >&2
  exit 1; }

quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }  # this machine's pip.conf

rm -rf "$DIR"
mkdir -p "$DIR"
echo "== binary dependencies for cp$TARGET_PY manylinux x86_64"
quiet "$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$TARGET_PY" \
  "${PLATFORMS[@]}" -d "$DIR" "${BINARY[@]}"

echo "== $DEEPSPEED: sdist -> pure wheel (DS_BUILD_OPS=0: no compiled ops, all JIT)"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
DS_BUILD_OPS=0 quiet "$PY" -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation --no-binary deepspeed -w "$build" "$DEEPSPEED"
mv "$build"/deepspeed-*.whl "$DIR"/

echo "== megalm (this working tree, --no-deps)"
leftovers=()
for d in build megalm.egg-info; do [ -e "$d" ] || leftovers+=("$d"); done
quiet "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$build" .
mv "$build"/megalm-*.whl "$DIR"/
[ ${#leftovers[@]} -eq 0 ] || rm -rf "${leftovers[@]}"  # only what this build created (gitignored anyway)

echo "== checking the wheelhouse"
"$PY" - "$DIR" "$TARGET_PY" "$LIMIT_MIB" <<'EOF'
"""Every wheel pure or cp312-manylinux; DeepSpeed's wheel has no compiled code; every dependency of every
wheel (markers evaluated for CPython 3.12 on Linux) is either in the wheelhouse or on the host."""
import os, sys, zipfile
from email.parser import Parser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

# The GPU host's preinstalled packages (the device kinds' package list, 2026-11-17), names only.
HOST = set(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp""".split())

wheelhouse, pyver, limit_mib = sys.argv[1], sys.argv[2], float(sys.argv[3])
env = {"python_version": pyver, "python_full_version": pyver + ".3", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
have, problems, total = {}, [], 0
files = sorted(f for f in os.listdir(wheelhouse) if f.endswith(".whl"))
for f in files:
    name, version, _, tags = parse_wheel_filename(f)
    have[name] = version
    ok = any((t.interpreter in ("py3", "cp" + pyver.replace(".", "")) and t.platform == "any") or
             (t.interpreter == "cp" + pyver.replace(".", "") and t.platform.startswith("manylinux") and
              t.platform.endswith("x86_64")) for t in tags)
    if not ok:
        problems.append(f"{f}: not installable on CPython {pyver} manylinux x86_64")
    with zipfile.ZipFile(os.path.join(wheelhouse, f)) as z:
        if name == "deepspeed":
            compiled = [n for n in z.namelist() if n.endswith((".so", ".pyd"))]
            if compiled:
                problems.append(f"{f}: holds compiled ops {compiled[:3]} (build with DS_BUILD_OPS=0)")
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        reqs = Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []
    for r in map(Requirement, reqs):
        if r.marker is not None and not r.marker.evaluate(env):
            continue
        dep = canonicalize_name(r.name)
        if dep in have or any(canonicalize_name(parse_wheel_filename(g)[0]) == dep for g in files):
            continue
        if dep not in HOST:
            problems.append(f"{f}: needs {r} -- neither in the wheelhouse nor on the host")
for f in files:
    size = os.path.getsize(os.path.join(wheelhouse, f))
    total += size
    print(f"  {size / 2**20:7.2f} MiB  {f}")
print(f"  {total / 2**20:7.2f} MiB  total, {len(files)} wheels in {wheelhouse}/")
if total > limit_mib * 2**20:
    problems.append(f"total {total / 2**20:.1f} MiB exceeds {limit_mib:g} MiB")
for p in problems:
    print("PROBLEM:", p)
sys.exit(1 if problems else 0)
EOF
