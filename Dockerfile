# A small image for schedulers (Kubernetes CronJob, ECS, Nomad): `docker build -t testpress-sync .`
FROM python:3.11-slim
WORKDIR /opt/testpress-sync
COPY pyproject.toml README.md ./
COPY sync sync
COPY schema schema
COPY alembic alembic
RUN pip install --no-cache-dir . && useradd --system --no-create-home testpress-sync
USER testpress-sync
ENV TESTPRESS_LOG_FORMAT=json
ENTRYPOINT ["testpress-sync"]
CMD ["run"]
