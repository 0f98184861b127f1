"""The FedKDLoRA Flower app: what the ServerApp and the ClientApp run.

This package is the FAB every SuperNode receives (`fab-include` in pyproject.toml); the
command-line tools live in `fedkdlora_tools`. `server_app` and `client_app` are the two
entry points; `protocol` is the message format between them.
"""
