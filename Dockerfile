# bids-anomaly BIDS App image.
#
#   CPU (default):  docker build -t bids-anomaly:0.1.0 .
#   CUDA 12.x:      docker build -t bids-anomaly:0.1.0-cuda --build-arg TORCH_VARIANT=cu128 .
#
# TORCH_VARIANT names a PyTorch wheel index, https://download.pytorch.org/whl/<TORCH_VARIANT>:
# "cpu" (default, ~1 GB smaller) or a CUDA 12 index that hosts torch==${TORCH_VERSION}
# (cu126, cu128, cu129, ...). The CUDA wheels carry the CUDA runtime, cuDNN and cuBLAS as pip
# packages, so both variants share the slim Python base: the host only needs an NVIDIA driver
# recent enough for that CUDA release (`docker run --gpus all ...`, Apptainer `--nv`) and the
# app is told `--device cuda`. BASE_IMAGE may point at a mirror of the same Debian Python image.
#
# Run (any UID works; the image needs no network):
#   docker run --rm --user "$(id -u):$(id -g)" \
#     -v /data/bids:/data:ro -v /data/out:/out -v /scratch/work:/work \
#     bids-anomaly:0.1.0 /data /out participant --model /out/models/dae -w /work
# See containers/README.md (Apptainer, SLURM, GPUs).

ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG VERSION=0.1.0
ARG BUILD_DATE=""
ARG VCS_REF=""
# Build-time only (ARG values are not kept in the image's environment).
ARG PIP_DISABLE_PIP_VERSION_CHECK=1
ARG PIP_ROOT_USER_ACTION=ignore

LABEL org.opencontainers.image.title="bids-anomaly" \
      org.opencontainers.image.description="BIDS App for unsupervised anomaly detection in brain MRI with models trained on healthy scans" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.authors="bids-anomaly developers" \
      org.opencontainers.image.vendor="bids-anomaly developers" \
      org.opencontainers.image.url="https://github.com/bids-anomaly/bids-anomaly" \
      org.opencontainers.image.source="https://github.com/bids-anomaly/bids-anomaly" \
      org.opencontainers.image.documentation="https://github.com/bids-anomaly/bids-anomaly/blob/main/containers/README.md" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm" \
      org.bids-anomaly.torch-variant="${TORCH_VARIANT}"

# HOME is world-writable (sticky, like /tmp) so that `docker run --user <any uid>` can write its
# caches; every cache lives under it. Offline and single-threaded by default: nipype sizes the
# threads of each node (--nprocs / --omp-nthreads), and idle OpenMP threads must not spin.
ENV HOME=/home/bidsanomaly \
    XDG_CACHE_HOME=/home/bidsanomaly/.cache \
    TORCH_HOME=/home/bidsanomaly/.cache/torch \
    MPLCONFIGDIR=/home/bidsanomaly/.cache/matplotlib \
    PYTHONNOUSERSITE=1 \
    PYTHONUNBUFFERED=1 \
    NIPYPE_NO_ET=1 \
    OMP_WAIT_POLICY=PASSIVE \
    KMP_BLOCKTIME=0 \
    OMP_NUM_THREADS=1 \
    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 \
    BIDS_ANOMALY_IMAGE_TAG=bids-anomaly:${VERSION}

# Fixed numeric UID/GID 1000 for the default user; no login shell, no password.
RUN groupadd --gid 1000 bidsanomaly \
    && useradd --uid 1000 --gid 1000 --no-log-init --no-create-home \
        --home-dir /home/bidsanomaly --shell /usr/sbin/nologin bidsanomaly \
    && mkdir -p /home/bidsanomaly /work \
    && chmod 1777 /home/bidsanomaly /work

# torch first, from the PyTorch index of the chosen variant: `pip install .` would otherwise pull
# the multi-GB CUDA build from PyPI. 2.13.0+cpu satisfies the package's torch==2.13.0 pin.
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==${TORCH_VERSION}" \
    && python -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(v != '${TORCH_VERSION}+${TORCH_VARIANT}')"

WORKDIR /tmp/src

# Dependencies in their own layer (read from pyproject.toml), so code changes rebuild only the
# small layer below. antspyx, SimpleITK and the rest ship manylinux wheels: no compiler needed.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm -f /tmp/requirements.txt

COPY bids_anomaly ./bids_anomaly
COPY cli ./cli
RUN pip install --no-cache-dir . \
    && pip check \
    && rm -rf /tmp/src

WORKDIR /work

# Warm every cache at build time so nothing downloads at run time (and fail the build early if
# something is missing): the MNI152NLin2009aSym template (nilearn package data), deepbet's
# weights (shipped in its wheel, next to the package) and matplotlib's font cache. Run from
# /work so that the installed package, not a source tree, is imported. Caches stay writable by
# any UID.
RUN python -c "import ants, SimpleITK, monai, nipype, bids, nilearn, bids_anomaly.cli.main, bids_anomaly.workflows" \
    && python -c "from bids_anomaly.core.templates import load_template; load_template(1); load_template(2)" \
    && python -c "import deepbet, pathlib; from deepbet.utils import DATA_PATH; w = [pathlib.Path(DATA_PATH, 'models', n) for n in ('model.pt', 'bbox_model.pt')]; assert all(p.is_file() and p.stat().st_size > 1000000 for p in w), w; from deepbet.bet import BrainExtraction; BrainExtraction(no_gpu=True)" \
    && python -c "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot" \
    && bids-anomaly --version \
    && find /home/bidsanomaly -mindepth 1 -type d -exec chmod 1777 {} + \
    && find /home/bidsanomaly -type f -exec chmod a+rw {} +

# Numeric, so Kubernetes' runAsNonRoot can verify it; `docker run --user UID:GID` overrides it
# (HOME and /work are world-writable). Apptainer ignores USER and runs as the calling user.
USER 1000:1000

HEALTHCHECK --interval=5m --timeout=30s --start-period=10s --retries=1 \
    CMD ["bids-anomaly", "--version"]

ENTRYPOINT ["bids-anomaly"]
CMD ["--help"]
