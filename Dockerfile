FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/dataengine
COPY pyproject.toml README.md ./
COPY dataengine ./dataengine
COPY indexes ./indexes
COPY trainer ./trainer
RUN pip install .
WORKDIR /work
ENTRYPOINT ["dataengine"]
CMD ["--help"]
