# syntax=docker/dockerfile:1
# One image for the controller (`evalrunner controller`) and the runner
# (`evalrunner run-suite`, what each Job pod runs). Built and tested by users
# with Docker; see scripts/kind-e2e.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
# A fixed non-root uid: the chart's securityContext runs as 65532 too.
RUN groupadd --gid 65532 evalrunner \
 && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin evalrunner
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels evalrunner \
 && rm -rf /wheels
# The example suites' Python targets, so the examples run in the cluster as they do locally
# (an EvalRun sets PYTHONPATH=/opt/evalrunner/examples/suites to use them).
COPY examples/suites /opt/evalrunner/examples/suites
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 EVALRUNNER_LOG_FORMAT=json
USER 65532:65532
ENTRYPOINT ["evalrunner"]
CMD ["--help"]
