"""The agent: runs on the box with its own python3 (>= 3.9), standard library only.

It holds the runner (the DAG executor), the state file, step execution and the status/follow
reports the controller reads over one SSH round trip.
"""
