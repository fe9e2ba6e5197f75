pytest_plugins = ["servers", "kfp_api", "process_hygiene"]
