# The control plane only (`picoiot server`; the plain install, without the `firmware` extra), for a fleet that
# outgrows one machine: stateless replicas on one PostgreSQL database (PICOIOT_DB), long-polls woken across replicas
# by LISTEN/NOTIFY. Runs as a non-root user; the signing and enrollment keys come from a mounted secrets.json
# (deploy/kubernetes/: a Secret). docs/control-plane.md, "Deployment".
#   docker build -t picoiot-control-plane .
#   docker run -e PICOIOT_DB=postgresql://user:pass@db:5432/picoiot -p 8080:8080 picoiot-control-plane
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/picoiot --create-home picoiot
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001:10001
ENV PICOIOT_DATA_DIR=/var/lib/picoiot PYTHONUNBUFFERED=1
WORKDIR /var/lib/picoiot
EXPOSE 8080
# SIGTERM: held long-polls answer at once (devices poll again on another replica), then in-flight requests finish
STOPSIGNAL SIGTERM
ENTRYPOINT ["picoiot", "server", "--host", "0.0.0.0", "--port", "8080"]
