# The ledger's services for docker-compose.yml (the NATS cluster comes from the official image).
# A full version tag, never a moving one (`3.11-slim` changes under a rebuild): bump it on purpose.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# A user of its own, by number too (Kubernetes' runAsNonRoot checks a numeric USER). /data is its one writable
# place: a named volume mounted there starts with this ownership.
RUN groupadd --system --gid 10001 ledger \
 && useradd --system --uid 10001 --gid ledger --home-dir /data --no-create-home --shell /usr/sbin/nologin ledger \
 && mkdir /data && chown ledger:ledger /data

WORKDIR /app
# The code stays root's and read-only to the services.
COPY pyproject.toml README.md ./
COPY ledger ledger
COPY projections projections
COPY consumers consumers
COPY ledgerctl ledgerctl
RUN pip install --no-cache-dir '.[cli]'

USER 10001:10001
WORKDIR /data

# `ledger up` serves HTTP on port 8080 with /readyz (ready = the projections caught up). The slim image has no
# curl: python's urllib does (an HTTP error or no answer raises, so the check exits 1). Containers that run
# other commands (`ledger consumers`, `ledger init`) switch it off in docker-compose.yml.
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4)"]

ENTRYPOINT []
CMD ["ledger", "--help"]
