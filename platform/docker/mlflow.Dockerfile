# syntax=docker/dockerfile:1.7
# The MLflow tracking server of platform/k8s/mlflow.yaml: mlflow with its basic-auth extra,
# the Postgres driver (backend and auth stores) and boto3 (S3 artifact destination).
# No CUDA, no torch: the server only stores and proxies.
#
#   docker build -f platform/docker/mlflow.Dockerfile -t REGISTRY/binarydm/mlflow:3.17.2 platform/docker
# MLFLOW_VERSION must equal the mlflow pin of pyproject.toml: clients and server of one
# version agree on the REST API and the database schema (tests/platform checks it).
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG2_VERSION=2.9.13
ARG BOTO3_VERSION=1.44.5

RUN pip install --no-cache-dir \
        "mlflow[auth]==${MLFLOW_VERSION}" \
        "psycopg2-binary==${PSYCOPG2_VERSION}" \
        "boto3==${BOTO3_VERSION}" \
    && useradd --create-home --uid 1000 mlflow

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
