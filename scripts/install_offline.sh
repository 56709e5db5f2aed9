#!/usr/bin/env bash
# Install megalm's missing dependencies from a wheelhouse (scripts/wheelhouse.sh) on a host without
# network access, into the host's existing Python, so that its torch (and everything else it has) is
# used as it is. Never installs, upgrades or removes torch: every install is --no-index --no-deps.
#
#   bash scripts/install_offline.sh WHEELHOUSE [--target DIR] [--force]
#
#   (default)      install into $PYTHON (default: python3)'s own environment, e.g. /opt/torch/.venv
#   --target DIR   install into DIR instead and leave that environment untouched; then
#                  export PYTHONPATH=DIR:$PYTHONPATH PATH=DIR/bin:$PATH   (printed at the end)
#   --force        install every wheel, also those whose package the host already has
#
# A wheel whose package the host already has in a version that satisfies every wheel in the wheelhouse
# is skipped (typing-extensions is in the wheelhouse only for a host whose copy is older than pydantic
# needs). Afterwards each requirement of DeepSpeed and its dependencies is checked against what is
# installed, megalm's pinned ones are listed where the host's version differs (torch 2.11 instead of
# our 2.13 pin, say), and deepspeed/pydantic/zstandard/megalm are imported. Exit status 1 on a problem.
# A plain `python3 -m venv --system-site-packages` made from /opt/torch/.venv would NOT see that venv's
# torch (it inherits the base interpreter's site-packages): use the default or --target instead.
set -euo pipefail
[ $# -ge 1 ] || { sed -n 2,20p "$0"; exit 2; }
WHEELHOUSE=$1; shift
TARGET=""; FORCE=0
while [ $# -gt 0 ]; do
  case $1 in
    --target) TARGET=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    *) echo "install_offline.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -d "$WHEELHOUSE" ] || { echo "install_offline.sh: no wheelhouse at $WHEELHOUSE (build it with scripts/wheelhouse.sh)" >&2; exit 1; }

# Which wheels to install: decided by the target Python itself (its own packaging/importlib.metadata).
mapfile -t WHEELS < <("$PY" - "$WHEELHOUSE" "$FORCE" <<'EOF'
import importlib.metadata as md, os, sys, zipfile
from email.parser import Parser
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import Version

wheelhouse, force = sys.argv[1], sys.argv[2] == "1"
files = sorted(f for f in os.listdir(wheelhouse) if f.endswith(".whl"))
needs = {}  # dependency -> specifiers asked by the wheelhouse's wheels
for f in files:
    with zipfile.ZipFile(os.path.join(wheelhouse, f)) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for r in map(Requirement, Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                needs.setdefault(canonicalize_name(r.name), []).append(r.specifier)
for f in files:
    name, version, _, _ = parse_wheel_filename(f)
    if name in ("torch",) or name.startswith("nvidia-"):
        print(f"install_offline.sh: refusing {f}: torch and CUDA libraries come from the host", file=sys.stderr)
        continue
    try:
        host = Version(md.version(name))
    except md.PackageNotFoundError:
        host = None
    always = name in ("deepspeed", "megalm")
    if host is not None and not force and not always and all(host in s for s in needs.get(name, [])):
        print(f"  skip {f}: the host has {name} {host}", file=sys.stderr)
        continue
    print(os.path.join(wheelhouse, f))
EOF
)

args=(-m pip install --no-index --find-links "$WHEELHOUSE" --no-deps --no-compile --disable-pip-version-check -q)
if [ -n "$TARGET" ]; then
  mkdir -p "$TARGET"
  args+=(--upgrade --target "$TARGET")
  export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ ${#WHEELS[@]} -gt 0 ]; then
  printf '  install %s\n' "${WHEELS[@]##*/}"
  "$PY" "${args[@]}" "${WHEELS[@]}"
fi

# Check: DeepSpeed's requirements (and theirs) satisfied; megalm's pins compared; the modules import.
"$PY" - <<'EOF'
import importlib, importlib.metadata as md, sys
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

problems, seen, todo = [], set(), ["deepspeed"]
while todo:
    name = todo.pop()
    if name in seen:
        continue
    seen.add(name)
    try:
        reqs = md.requires(name) or []
    except md.PackageNotFoundError:
        problems.append(f"{name} is not installed")
        continue
    for r in map(Requirement, reqs):
        if r.marker is not None and not r.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(r.name)
        except md.PackageNotFoundError:
            problems.append(f"{name} needs {r}: not installed")
            continue
        if not r.specifier.contains(have, prereleases=True):
            problems.append(f"{name} needs {r}: {have} installed")
        elif r.name.lower() != "torch":
            todo.append(r.name)
diffs = []
for r in map(Requirement, md.requires("megalm") or []):
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue
    try:
        have = md.version(r.name)
    except md.PackageNotFoundError:
        problems.append(f"megalm needs {r}: not installed")
        continue
    if not r.specifier.contains(have, prereleases=True):
        diffs.append(f"{r.name} {have} (megalm pins {r.specifier})")
if diffs:
    print("  host versions that differ from megalm's pins (used as they are):", ", ".join(diffs))
for mod in ("pydantic", "hjson", "zstandard", "torch", "deepspeed", "megalm"):
    try:
        m = importlib.import_module(mod)
        print(f"  import {mod}: ok {getattr(m, '__version__', '')}".rstrip())
    except Exception as e:  # noqa: BLE001 - report every failure
        problems.append(f"import {mod}: {type(e).__name__}: {e}")
for p in problems:
    print("PROBLEM:", p)
sys.exit(1 if problems else 0)
EOF
if [ -n "$TARGET" ]; then
  echo "installed into $TARGET: export PYTHONPATH=$TARGET\${PYTHONPATH:+:\$PYTHONPATH} PATH=$TARGET/bin:\$PATH"
fi
