pytest_plugins = ["servers", "kfp_api"]
