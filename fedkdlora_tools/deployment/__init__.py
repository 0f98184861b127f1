"""The app on Flower's deployment engine, on this machine: a SuperLink and SuperNodes as real processes.

Each process is started through the `deploy/` script a person would run on that host
(`start-superlink.sh`, `start-supernode.sh`); the harness adds what a script cannot do
well: bounded waits on readiness, SuperNode registration, submitting a run and polling
its real outcome, stopping a SuperNode mid-round, private filesystems and network
namespaces per host, and killing every process it started, even on failure.

- `hosts`: where the `deploy/` scripts are; network and mount namespaces (a host each).
- `partitions`: one SuperNode's own data folder.
- `local`: `LocalDeployment`, the processes of one deployment, and `RunOutcome`.
- `scenarios`: what docs/deployment.md measures and the tests assert.
- `__main__`: `python -m fedkdlora_tools.deployment connect|submit|scenario|export-partition`.
"""
