# The Quanta server image: one container runs a whole single server (`quanta server`: Core, Switch Host
# and Switches, Coordinator, web tier, HTTP tier, Integrate Agent) on a data volume, on PostgreSQL.
# compose.yaml runs it with a PostgreSQL service; docs/operations.md ("Container") explains both.
# BASE_IMAGE: any image with Python 3.11+ whose `python` and `pip` are on PATH and install into a
# writable prefix (python:3.11-slim from Docker Hub by default). A machine without Docker Hub can pass
# a local one; docs/operations.md ("Container") shows how this image was built and run that way.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    QUANTA_DATA=/var/lib/quanta

# The server needs no root: it runs as this account, which owns the data volume (0700).
ARG QUANTA_UID=10001
RUN groupadd --system --gid "${QUANTA_UID}" quanta \
 && useradd --system --uid "${QUANTA_UID}" --gid quanta --home-dir /var/lib/quanta --no-create-home \
            --shell /usr/sbin/nologin quanta \
 && install -d -o quanta -g quanta -m 0700 /var/lib/quanta

WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[postgres]" && rm -rf /build

COPY docker/entrypoint.sh /usr/local/bin/quanta-entrypoint
COPY docker/healthcheck.py /usr/local/lib/quanta/healthcheck.py
RUN chmod 0755 /usr/local/bin/quanta-entrypoint && chmod 0644 /usr/local/lib/quanta/healthcheck.py

WORKDIR /var/lib/quanta
VOLUME ["/var/lib/quanta"]
USER quanta

# https (Consumer API, Portal, Background Channel), http (CRL, Catalog), the first Switch (docs/ports.md).
# Inside the container the server binds the default ports; Docker lets an unprivileged process bind
# ports below 1024 in a container (net.ipv4.ip_unprivileged_port_start=0).
EXPOSE 443 80 4000

HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "/usr/local/lib/quanta/healthcheck.py"]

# The supervisor stops its components on SIGTERM (each within 10 s); compose.yaml gives it 60 s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/quanta-entrypoint"]
CMD ["server"]
