"""Watching a training run and explaining failures: training-log parsing, nvidia-smi and host
probes, alert rules and pre-flight checks (the failure catalog they use is
`provision.agent.catalog`: the runner and the kinds read it too).

Everything here is standard-library only and Python 3.9 compatible: it runs on the box inside
the agent (one SSH round trip per `monitor`/`check`) as well as on the controller.
"""
