# The ledger's services for docker-compose.yml (the NATS cluster comes from the official image).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY ledger ledger
COPY projections projections
COPY consumers consumers
COPY ledgerctl ledgerctl
RUN pip install --no-cache-dir '.[cli]'
ENTRYPOINT []
CMD ["ledger", "--help"]
