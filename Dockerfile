# Images of rlhf-operator. Two targets:
#   docker build --target operator -t ghcr.io/rlhf-operator/operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/rlhf-operator/trainer:0.1.0 .
# Tags follow the chart's appVersion (charts/rlhf-operator/Chart.yaml), which is also the
# project version in pyproject.toml. Rollout and judge servers use the upstream vLLM and
# lmdeploy images (chart values defaults.vllm.image and defaults.lmdeploy.image).
#
# Base images are pinned by full version tag. Pin them by digest as well in your registry
# mirror (`FROM image:tag@sha256:...`) when you need bit-for-bit rebuilds.

ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# Build the project wheel once; both targets install it.
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------
# The operator's runtime dependencies, with the version ranges of pyproject.toml: only the
# distributions the operator imports. torch and the rest of the trainer stack stay out.
FROM ${PYTHON_IMAGE} AS operator-deps
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import re, tomllib; \
keep = {'kopf', 'kubernetes', 'pydantic', 'pyyaml', 'prometheus-client', 'rich', 'matplotlib'}; \
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
name = lambda d: re.split(r'[<>=!~;\[ ]', d, maxsplit=1)[0].lower(); \
print('\n'.join(d for d in deps if name(d) in keep))" > /operator-requirements.txt \
 && cat /operator-requirements.txt \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -r /operator-requirements.txt

# ---------------------------------------------------------------------------------------------
# The operator: kopf, the planner and the builders. Slim, no torch, non-root, read-only root FS.
FROM ${PYTHON_IMAGE} AS operator
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=operator-deps /opt/venv /opt/venv
COPY --from=wheel /wheels /wheels
# --no-deps: the wheel's own dependency list includes the trainer stack (torch, transformers).
RUN pip install --no-cache-dir --no-deps /wheels/*.whl \
 && rm -rf /wheels \
 && python -c "import rlhf_operator.cli, kopf; import importlib.util as u; \
assert u.find_spec('torch') is None, 'torch must not be in the operator image'"
# A numeric user, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 65532:65532
EXPOSE 8080 8081 9443
ENTRYPOINT ["rlhf"]
CMD ["operator", "--standalone", "--all-namespaces"]

# ---------------------------------------------------------------------------------------------
# The trainer: torch (CUDA wheels from PyPI, pinned as in the Makefile), the trainer stack, and
# the project. The CUDA base gives the NVIDIA container runtime its hooks; the CUDA libraries
# themselves come with the torch wheel.
FROM ${CUDA_IMAGE} AS trainer
ARG TORCH_SPEC=torch==2.13.0
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/workspace/.cache/huggingface
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && pip install --no-cache-dir "${TORCH_SPEC}"
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
 && rm -rf /wheels \
 && python -c "import torch, transformers, rlhf_trainer.config"
RUN useradd --uid 65532 --create-home --home-dir /home/trainer --shell /usr/sbin/nologin trainer
USER 65532:65532
WORKDIR /workspace
ENTRYPOINT ["python", "-m", "rlhf_trainer"]
