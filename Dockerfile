# syntax=docker/dockerfile:1
# One Dockerfile, two images:
#   docker build --target service -t vlpipe .         ingest, broker, egress (small)
#   docker build --target engine  -t vlpipe-engine .  the local Voice Live engine, with
#                                                      its speech models (VAD, Whisper, espeak-ng)
# Every dependency ships as a wheel, so no stage needs a compiler.

ARG PYTHON=python:3.11-slim-bookworm

FROM ${PYTHON} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/vlpipe
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vlpipe ./vlpipe
RUN /opt/vlpipe/bin/pip install --only-binary=:all: . \
 && /opt/vlpipe/bin/vlpipe --version

FROM build AS build-engine
RUN /opt/vlpipe/bin/pip install --only-binary=:all: ".[engine]"

FROM ${PYTHON} AS runtime
ENV PATH=/opt/vlpipe/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VLPIPE_HTTP_HOST=0.0.0.0
# /var/lib/vlpipe: where `vlpipe redis-acl` writes the ACL file for Redis (a volume).
RUN useradd --system --uid 10001 --home-dir /home/vlpipe --create-home vlpipe \
 && install -d -o 10001 -g 10001 /var/lib/vlpipe
USER 10001:10001
WORKDIR /home/vlpipe
ENTRYPOINT ["vlpipe"]

FROM runtime AS service
COPY --from=build /opt/vlpipe /opt/vlpipe
# VLPIPE_HTTP_PORT is the service's health port (ingest 9101, broker 9102, egress 9103).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['VLPIPE_HTTP_PORT'], timeout=2)"]
CMD ["--help"]

FROM runtime AS engine
COPY --from=build-engine /opt/vlpipe /opt/vlpipe
ENV VLPIPE_ENGINE_HOST=0.0.0.0 VLPIPE_ENGINE_PORT=8765
EXPOSE 8765
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ['VLPIPE_ENGINE_PORT'], timeout=2)"]
CMD ["engine"]
