#!/bin/bash
# Submit bids-anomaly on SLURM: a job array for the participant level (one participant per
# task, containers/slurm_array.sbatch), then the group level, which starts once every array
# task has ended, whether it succeeded or not (afterany: one failed participant must not
# block the group table; failures are listed in it).
#
# Usage: containers/submit.sh BIDS_DIR OUTPUT_DIR MODEL [IMAGE] [-- SBATCH_OPTION...]
#   MODEL  a model bundle folder, e.g. /data/ixi/derivatives/bids-anomaly/models/dae
#   IMAGE  the .sif image [default: $IMAGE or ./bids-anomaly-0.1.0.sif]
#   options after -- go to both sbatch calls (e.g. --account=abc --partition=cpu)
# Also read: MAX_PARALLEL (array tasks at once, default 50) and what slurm_array.sbatch reads
# (WORK_ROOT, KEEP_WORK, USE_GPU, EXTRA_ARGS). Logs go to ./logs/.

set -euo pipefail

usage() {
    echo "usage: $0 BIDS_DIR OUTPUT_DIR MODEL [IMAGE] [-- SBATCH_OPTION...]" >&2
    exit 64
}

[[ $# -ge 3 ]] || usage
BIDS_DIR="$(realpath -- "$1")"
OUTPUT_DIR="$(realpath -m -- "$2")"
MODEL="$(realpath -- "$3")"
shift 3
IMAGE="${IMAGE:-bids-anomaly-0.1.0.sif}"
if [[ $# -gt 0 && "$1" != "--" ]]; then
    IMAGE="$1"
    shift
fi
[[ $# -gt 0 && "$1" == "--" ]] && shift
sbatch_opts=("$@")
IMAGE="$(realpath -- "${IMAGE}")"
MAX_PARALLEL="${MAX_PARALLEL:-50}"

here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
participants="${BIDS_DIR}/participants.tsv"
for f in "${participants}" "${IMAGE}"; do
    if [[ ! -r "${f}" ]]; then
        echo "error: cannot read ${f}" >&2
        exit 66
    fi
done
if [[ ! -d "${MODEL}" ]]; then
    echo "error: ${MODEL} is not a model bundle folder" >&2
    exit 66
fi

# Rows after the header that are not blank: the same rows slurm_array.sbatch counts.
n="$(awk 'NR > 1 && NF' "${participants}" | wc -l)"
if [[ "${n}" -eq 0 ]]; then
    echo "error: no participants in ${participants}" >&2
    exit 18
fi

mkdir -p logs "${OUTPUT_DIR}"
export BIDS_DIR OUTPUT_DIR MODEL IMAGE

# --parsable prints "jobid" or "jobid;cluster".
array_id="$(sbatch --parsable ${sbatch_opts[@]+"${sbatch_opts[@]}"} \
    --array="1-${n}%${MAX_PARALLEL}" "${here}/slurm_array.sbatch")"
array_id="${array_id%%;*}"
echo "participant level: job array ${array_id} (${n} participants)"

# The group job reads BIDS_DIR, OUTPUT_DIR and IMAGE from the exported environment.
group_id="$(sbatch --parsable ${sbatch_opts[@]+"${sbatch_opts[@]}"} \
    --dependency="afterany:${array_id}" \
    --job-name=bids-anomaly-group --cpus-per-task=1 --mem=4G --time=00:30:00 \
    --output=logs/%x_%j.out --error=logs/%x_%j.err <<'EOF'
#!/bin/bash
set -euo pipefail
if command -v apptainer >/dev/null 2>&1; then APPTAINER=apptainer; else APPTAINER=singularity; fi
"${APPTAINER}" run --cleanenv \
    -B "${BIDS_DIR}:/data:ro" -B "${OUTPUT_DIR}:/out" \
    "${IMAGE}" /data /out group
EOF
)"
group_id="${group_id%%;*}"
echo "group level: job ${group_id} (after ${array_id})"
