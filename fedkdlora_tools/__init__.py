"""FedKDLoRA's command-line tools: run, compare, plot, pre-train a teacher, deploy locally.

They run where a person works (a workstation, a test machine), never on a SuperNode:
`flwr build` packs only `fedkdlora_app` (see `fab-include` in pyproject.toml), the code
the ServerApp and ClientApp run.
"""
