# randkit model server: `docker build -t randkit-serve .` then
# `docker run -p 8000:8000 -p 8001:8001 -v $PWD/repo:/models:ro -v ledger:/ledger randkit-serve`.
# CPU image; constraints.txt pins torch's wheel from PyPI (a CUDA base image and wheel for GPUs).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml setup.py constraints.txt README.md ./
COPY src ./src
# gcc builds the Gaussian-noise kernel (without it randkit falls back to torch operations).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt '.[serve]'

FROM python:3.11-slim
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 randkit && mkdir /ledger && chown randkit /ledger
USER randkit
# The experiment ledger (predictions, feedback, counts) lives outside the read-only model
# mount: a volume, so that it outlives the container; or a postgresql:// URL instead.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 RANDKIT_LEDGER=/ledger/ledger.sqlite
VOLUME /ledger
EXPOSE 8000 8001
HEALTHCHECK --interval=30s --timeout=3s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready')"
# Inside a container the server must listen on all interfaces to be reachable; the default
# outside Docker stays 127.0.0.1. Set RANDKIT_TOKEN to require a bearer token.
ENTRYPOINT ["randkit", "serve", "/models", "--host", "0.0.0.0", "--port", "8000", \
            "--grpc-port", "8001"]
