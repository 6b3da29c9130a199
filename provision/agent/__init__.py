"""The agent: runs on the box with its own python3 (>= 3.9), standard library only.

It holds the runner (the DAG executor), the state file, step execution and the status/follow
reports the controller reads over one SSH round trip; and, below the step kinds (which import
them), the helpers every box-side module shares: `files` (atomic writes, JSON, log tails),
`paths` (the agent's directories, honouring `$BOOTSTRAP_AGENT_DIR`), `units`, `catalog` (the
known-issues catalog), `gpus`, `redact`.
"""
