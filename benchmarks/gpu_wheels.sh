#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_cohort.py carries to the GPU machine (exactly the set in
# benchmarks/gpu_wheels.txt, manylinux x86_64, no dependencies), write the template cache
# beside them, print each size and the total, and fail when wheels + cache + the working tree
# that travels with them exceed the 64 MiB a device call may carry.
#
#   bash benchmarks/gpu_wheels.sh                 # Python 3.12 (the GPU machine) -> .whl/
#   bash benchmarks/gpu_wheels.sh --python 3.11 --dest .whl311   # same names, for a local
#                                                 # dry run in a venv of another Python
#
# Run it in the repository root of the checkout that makes the device call (that checkout's
# working tree is what travels). .whl/ must be ignored: `echo /.whl/ >> .git/info/exclude`.
# The template cache needs nilearn where this runs (the project's own environment has it).
set -euo pipefail

PYV=3.12
DEST=.whl
LIMIT_MIB=64
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PYV=$2; shift 2 ;;
        --dest) DEST=$2; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 64 ;;
    esac
done
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
LIST="$HERE/gpu_wheels.txt"
PY=${PYTHON:-python3}
ABI="cp${PYV/./}"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux_2_5_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # exactly the listed set: two versions of one package stop the install
while read -r spec flag _; do
    case "$spec" in ''|\#*) continue ;; esac
    case "$spec" in numpy==*|scipy==*|torch==*)
        echo "refusing to carry $spec: the GPU machine has its own" >&2; exit 1 ;;
    esac
    if [ "${flag:-}" = pure ]; then
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
            --implementation py --abi none --platform any -d "$DEST" "$spec"
    else
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
            --implementation cp --abi "$ABI" --abi abi3 --abi none "${PLATFORMS[@]}" \
            -d "$DEST" "$spec"
    fi
done < "$LIST"

# The MNI152 arrays nilearn would give (nilearn itself stays behind).
rm -rf "$DEST/cache"
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$HERE/gpu_cohort.py" \
    --write-template-cache "$DEST/cache" >/dev/null

"$PY" - "$DEST" "$LIST" "$REPO" "$LIMIT_MIB" <<'EOF'
import re, subprocess, sys
from pathlib import Path

dest, listing, repo, limit = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
wanted = {norm(line.split("==")[0]) for line in listing.read_text().splitlines()
          if line.strip() and not line.startswith("#")}
wheels = sorted(dest.glob("*.whl"), key=lambda p: -p.stat().st_size)
got = {norm(w.name.split("-")[0]) for w in wheels}
if got != wanted:
    sys.exit(f"wheel set differs from {listing.name}: missing {sorted(wanted - got)}, "
             f"extra {sorted(got - wanted)}")
mib = lambda b: b / 2**20
for w in wheels:
    print(f"{mib(w.stat().st_size):7.2f} MiB  {w.name}")
whl = sum(w.stat().st_size for w in wheels)
cache = sum(p.stat().st_size for p in (dest / "cache").glob("*"))
# What travels besides: tracked and untracked-not-ignored files, and shared/ if present.
files = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "-c", "-o",
                        "--exclude-standard"], capture_output=True, check=True).stdout
tree = sum((repo / f).stat().st_size for f in files.decode().split("\0")
           if f and (repo / f).is_file() and not (repo / f).is_symlink())
shared = repo / "shared"
if shared.is_dir():
    tree += sum(p.stat().st_size for p in shared.rglob("*") if p.is_file())
total = whl + cache + tree
print(f"{len(wheels)} wheels {mib(whl):.1f} MiB + template cache {mib(cache):.1f} MiB "
      f"= {mib(whl + cache):.1f} MiB in {dest}/; with the working tree ({mib(tree):.1f} MiB): "
      f"{mib(total):.1f} MiB of {limit:.0f} MiB")
if mib(total) > limit:
    sys.exit(f"over the {limit:.0f} MiB a device call carries")
EOF
