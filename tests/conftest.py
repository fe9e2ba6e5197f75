pytest_plugins = ["servers", "kfp_api"]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``containers`` need a container engine and the built step image: they run only when
    the ``-m`` expression names them (``make test-images`` runs ``-m containers``)."""
    if "containers" in (config.option.markexpr or ""):
        return
    kept = [item for item in items if item.get_closest_marker("containers") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept
