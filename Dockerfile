# The migration service: one-shot worker by default (runs MIGRATION_MODE and exits non-zero
# on failure). Alternatives with the same image:
#   dagster-webserver -h 0.0.0.0 -p 3000 -w /app/workspace.yaml
#   dagster-daemon run -w /app/workspace.yaml
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    DAGSTER_EVENT_BATCH_SIZE=1000

RUN useradd --create-home --uid 10001 craftflow \
 && mkdir -p /opt/dagster/dagster_home /app \
 && chown -R craftflow /opt/dagster /app

WORKDIR /app
# Dependencies first, so code changes do not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir craftflow_migrations && touch craftflow_migrations/__init__.py \
 && pip install . && pip uninstall -y craftflow_migrations
COPY craftflow_migrations ./craftflow_migrations
COPY workspace.yaml ./
COPY dagster.yaml /opt/dagster/dagster_home/dagster.yaml
RUN pip install --no-deps . && python -c "import craftflow_migrations.cli"

USER craftflow
CMD ["craftflow-migrate"]
