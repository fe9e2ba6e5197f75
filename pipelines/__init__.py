"""Kubeflow pipeline definitions (installed as ``pfedla_pipelines``); compiled YAML is a build output."""
