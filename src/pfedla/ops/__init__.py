"""Operations: installing pfedla's platform on a Kubernetes cluster (``pfedla deploy``).

Nothing in the library's training path imports this package; it needs the ``kubernetes`` client
and ``kubectl`` (with kustomize) only when a cluster is set up.
"""
