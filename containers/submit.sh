#!/bin/bash
# Submit bids-anomaly on SLURM: a job array for the participant level (one participant per
# task, containers/slurm_array.sbatch), then the group level, which starts once every array
# task has ended, whether it succeeded or not (afterany: one failed participant must not
# block the group table; failures are listed in it).
#
# Usage: containers/submit.sh [OPTION...] BIDS_DIR OUTPUT_DIR MODEL [IMAGE] [-- SBATCH_OPTION...]
#   MODEL  a model bundle folder, e.g. /data/ixi/derivatives/bids-anomaly/models/dae
#   IMAGE  the .sif image [default: $IMAGE or ./bids-anomaly-0.1.0.sif]; "none": no container,
#          the installed bids-anomaly (on PATH, or $BIDS_ANOMALY) runs natively in every task
#   options after -- go to both sbatch calls (e.g. --account=abc --partition=cpu)
#
# Options (each also read from the environment variable in brackets):
#   --native                  same as IMAGE=none                                  [IMAGE=none]
#   --nprocs N                CPUs per participant: sbatch --cpus-per-task=N, and the app's
#                             --nprocs (from SLURM_CPUS_PER_TASK)                     [NPROCS]
#   --mem SIZE                memory per participant, the app's spelling (8GB, 500MB, 8 = GB):
#                             sbatch --mem, and the app's --mem (from SLURM_MEM_PER_NODE) [MEM]
#   --time D-HH:MM:SS         time limit per participant: sbatch --time                 [TIME]
#   --device cuda|cuda:N|cpu  cuda: sbatch --gres=gpu:1, and --device cuda (--nv with an image)
#                             in each task (the job sees its GPU as device 0)         [DEVICE]
#   --array LIST              only these array tasks (1-based rows of participants.tsv), e.g.
#                             3,7 or 2-5: re-runs chosen participants                  [ARRAY]
#   --resubmit-failed JOBID   only the tasks of array job JOBID that did not complete (from
#                             sacct; without accounting, from squeue or the jobcomp file while
#                             they still know the job)                       [RESUBMIT_FAILED]
#   --dry-run                 print the sbatch command lines and the group job script, submit
#                             nothing                                            [DRY_RUN=1]
# Unset --nprocs/--mem/--time leave slurm_array.sbatch's #SBATCH defaults (4 CPUs, 16G, 2 h).
# Also read: MAX_PARALLEL (array tasks at once, default 50), GROUP_MEM (default 4G),
# GROUP_TIME (default 00:30:00) and what slurm_array.sbatch reads (WORK_ROOT, KEEP_WORK,
# EXTRA_ARGS). Logs go to ./logs/.

set -euo pipefail

usage() {
    echo "usage: $0 [--native] [--nprocs N] [--mem SIZE] [--time T] [--device DEV]" \
        "[--array LIST | --resubmit-failed JOBID] [--dry-run]" \
        "BIDS_DIR OUTPUT_DIR MODEL [IMAGE] [-- SBATCH_OPTION...]" >&2
    exit 64
}

die() {
    local code="$1"
    shift
    echo "error: $*" >&2
    exit "${code}"
}

NPROCS="${NPROCS:-}"
MEM="${MEM:-}"
TIME="${TIME:-}"
DEVICE="${DEVICE:-}"
ARRAY="${ARRAY:-}"
RESUBMIT_FAILED="${RESUBMIT_FAILED:-}"
DRY_RUN="${DRY_RUN:-0}"
native=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --native) native=1 ;;
        --dry-run) DRY_RUN=1 ;;
        --nprocs | --mem | --time | --device | --array | --resubmit-failed)
            [[ $# -ge 2 ]] || usage
            case "$1" in
                --nprocs) NPROCS="$2" ;;
                --mem) MEM="$2" ;;
                --time) TIME="$2" ;;
                --device) DEVICE="$2" ;;
                --array) ARRAY="$2" ;;
                --resubmit-failed) RESUBMIT_FAILED="$2" ;;
            esac
            shift
            ;;
        -h | --help) usage ;;
        --) break ;;
        -*) echo "unknown option: $1" >&2; usage ;;
        *) break ;;
    esac
    shift
done

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
[[ "${native}" == 1 ]] && IMAGE=none
MAX_PARALLEL="${MAX_PARALLEL:-50}"
GROUP_MEM="${GROUP_MEM:-4G}"
GROUP_TIME="${GROUP_TIME:-00:30:00}"

here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
participants="${BIDS_DIR}/participants.tsv"
if [[ "${IMAGE}" == none ]]; then
    BIDS_ANOMALY="${BIDS_ANOMALY:-bids-anomaly}"
    command -v "${BIDS_ANOMALY}" >/dev/null 2>&1 ||
        die 66 "IMAGE=none but ${BIDS_ANOMALY} is not on PATH (activate its environment)"
    BIDS_ANOMALY="$(command -v "${BIDS_ANOMALY}")"
    export BIDS_ANOMALY
else
    IMAGE="$(realpath -- "${IMAGE}")"
    [[ -r "${IMAGE}" ]] || die 66 "cannot read ${IMAGE}"
fi
[[ -r "${participants}" ]] || die 66 "cannot read ${participants}"
[[ -d "${MODEL}" ]] || die 66 "${MODEL} is not a model bundle folder"

# Rows after the header that are not blank: the same rows slurm_array.sbatch counts.
n="$(awk 'NR > 1 && NF' "${participants}" | wc -l)"
[[ "${n}" -gt 0 ]] || die 18 "no participants in ${participants}"

# -- resources: the app's options, as sbatch options --------------------------------------

# The app's memory spelling (8GB, 500MB, 1.5G, 8 = 8 GB) as sbatch's (8G, 500M, 1536M).
sbatch_mem() {
    local v
    v="$(tr '[:lower:]' '[:upper:]' <<< "$1" | tr -d ' ')"
    [[ "${v}" =~ ^([0-9]+(\.[0-9]+)?)([KMGT]?)(I?B)?$ ]] ||
        die 64 "--mem ${1}: not a size such as 8GB or 500MB"
    local num="${BASH_REMATCH[1]}" unit="${BASH_REMATCH[3]:-G}"
    if [[ "${num}" =~ ^[0-9]+$ ]]; then
        echo "${num}${unit}"
    else  # sbatch takes whole numbers only: in MB, rounded up
        awk -v x="${num}" -v u="${unit}" 'BEGIN {
            f = (u == "K") ? 1 / 1024 : (u == "M") ? 1 : (u == "G") ? 1024 : 1048576
            m = x * f; r = int(m); if (r < m) r++; if (r < 1) r = 1; print r "M" }'
    fi
}

res_opts=()
if [[ -n "${NPROCS}" ]]; then
    [[ "${NPROCS}" =~ ^[1-9][0-9]*$ ]] || die 64 "--nprocs ${NPROCS}: not a positive integer"
    res_opts+=("--cpus-per-task=${NPROCS}")
fi
if [[ -n "${MEM}" ]]; then
    mem_opt="$(sbatch_mem "${MEM}")"
    res_opts+=("--mem=${mem_opt}")
fi
[[ -n "${TIME}" ]] && res_opts+=("--time=${TIME}")
case "${DEVICE}" in
    "" | auto | cpu) ;;
    cuda | cuda:[0-9]*)
        res_opts+=("--gres=gpu:1")
        USE_GPU=1
        export USE_GPU
        ;;
    *) die 64 "--device ${DEVICE}: expected auto, cpu, cuda or cuda:N" ;;
esac

# -- which array tasks ----------------------------------------------------------------------

# The task ids of array job $1 that ended in any state but COMPLETED, comma-separated.
# "JOBID_TASK STATE" lines come from sacct (accounting), else squeue (jobs slurmctld still
# remembers: MinJobAge), else the jobcomp/filetxt file.
failed_tasks() {
    local id="$1" states="" loc
    states="$(sacct -n -X -P -j "${id}" -o JobID,State 2>/dev/null | tr '|' ' ')" || states=""
    if [[ -z "${states}" ]]; then
        states="$(squeue -h -r -t all -j "${id}" -o '%i %T' 2>/dev/null)" || states=""
    fi
    if [[ -z "${states}" ]]; then
        loc="$(scontrol show config 2>/dev/null |
            awk '$1 == "JobCompType" && $3 == "jobcomp/filetxt" { t = 1 }
                 $1 == "JobCompLoc" { l = $3 } END { if (t) print l }')" || loc=""
        if [[ -n "${loc}" && -r "${loc}" ]]; then
            # One line per ended task; a later line for the same task (requeue) wins.
            states="$(awk -v id="${id}" '{
                    a = ""; t = ""; s = ""
                    for (i = 1; i <= NF; i++) {
                        split($i, kv, "=")
                        if (kv[1] == "ArrayJobId") a = kv[2]
                        else if (kv[1] == "ArrayTaskId") t = kv[2]
                        else if (kv[1] == "JobState") s = kv[2]
                    }
                    if (a == id && t != "") last[t] = s
                } END { for (t in last) print id "_" t, last[t] }' "${loc}")"
        fi
    fi
    [[ -n "${states}" ]] || die 69 "no record of job ${id} (sacct, squeue, jobcomp file):" \
        "give the tasks to re-run with --array LIST"
    if awk '$2 ~ /^(PENDING|RUNNING|CONFIGURING|COMPLETING|REQUEUED|RESIZING|SUSPENDED)/ {
            bad = 1 } END { exit !bad }' <<< "${states}"; then
        die 75 "array job ${id} has tasks that have not ended yet:"$'\n'"${states}"
    fi
    awk '{ n = split($1, p, "_"); if (n == 2 && p[2] ~ /^[0-9]+$/ && $2 !~ /^COMPLETED/)
        print p[2] }' <<< "${states}" | sort -n | paste -sd, -
}

if [[ -n "${RESUBMIT_FAILED}" ]]; then
    [[ -z "${ARRAY}" ]] || die 64 "give --array or --resubmit-failed, not both"
    ARRAY="$(failed_tasks "${RESUBMIT_FAILED%%;*}")"
    if [[ -z "${ARRAY}" ]]; then
        echo "array job ${RESUBMIT_FAILED}: every task completed, nothing to re-submit"
        exit 0
    fi
    echo "array job ${RESUBMIT_FAILED}: re-submitting tasks ${ARRAY}"
fi
if [[ -n "${ARRAY}" ]]; then
    [[ "${ARRAY}" =~ ^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$ ]] ||
        die 64 "--array ${ARRAY}: expected task ids such as 3,7 or 2-5"
    for t in $(tr ',-' '  ' <<< "${ARRAY}"); do
        [[ "${t}" -ge 1 && "${t}" -le "${n}" ]] ||
            die 64 "--array: task ${t} is outside 1-${n} (${participants})"
    done
    array_spec="${ARRAY}%${MAX_PARALLEL}"
else
    array_spec="1-${n}%${MAX_PARALLEL}"
fi

# -- the group job --------------------------------------------------------------------------

# Reads BIDS_DIR, OUTPUT_DIR and IMAGE (or BIDS_ANOMALY) from the exported environment.
if [[ "${IMAGE}" == none ]]; then
    group_script="$(cat <<'EOF'
#!/bin/bash
set -euo pipefail
"${BIDS_ANOMALY}" "${BIDS_DIR}" "${OUTPUT_DIR}" group
EOF
)"
else
    group_script="$(cat <<'EOF'
#!/bin/bash
set -euo pipefail
if command -v apptainer >/dev/null 2>&1; then APPTAINER=apptainer; else APPTAINER=singularity; fi
"${APPTAINER}" run --cleanenv \
    -B "${BIDS_DIR}:/data:ro" -B "${OUTPUT_DIR}:/out" \
    "${IMAGE}" /data /out group
EOF
)"
fi

array_cmd=(sbatch --parsable ${res_opts[@]+"${res_opts[@]}"}
    ${sbatch_opts[@]+"${sbatch_opts[@]}"} --array="${array_spec}" "${here}/slurm_array.sbatch")
group_opts=(--job-name=bids-anomaly-group --cpus-per-task=1 --mem="${GROUP_MEM}"
    --time="${GROUP_TIME}" --output=logs/%x_%j.out --error=logs/%x_%j.err)

if [[ "${DRY_RUN}" == 1 ]]; then
    echo "# dry run: nothing submitted. Environment of both jobs:"
    for v in BIDS_DIR OUTPUT_DIR MODEL IMAGE BIDS_ANOMALY USE_GPU; do
        [[ -n "${!v:-}" ]] && printf 'export %s=%q\n' "${v}" "${!v}"
    done
    printf '%q ' "${array_cmd[@]}"
    echo
    printf '%q ' sbatch --parsable ${sbatch_opts[@]+"${sbatch_opts[@]}"} \
        "--dependency=afterany:ARRAY_JOB_ID" "${group_opts[@]}"
    echo "<<'EOF'"
    echo "${group_script}"
    echo "EOF"
    exit 0
fi

mkdir -p logs "${OUTPUT_DIR}"
export BIDS_DIR OUTPUT_DIR MODEL IMAGE

# --parsable prints "jobid" or "jobid;cluster".
array_id="$("${array_cmd[@]}")"
array_id="${array_id%%;*}"
echo "participant level: job array ${array_id} (tasks ${array_spec%\%*} of ${n} participants)"

group_id="$(sbatch --parsable ${sbatch_opts[@]+"${sbatch_opts[@]}"} \
    --dependency="afterany:${array_id}" "${group_opts[@]}" <<< "${group_script}")"
group_id="${group_id%%;*}"
echo "group level: job ${group_id} (after ${array_id})"
