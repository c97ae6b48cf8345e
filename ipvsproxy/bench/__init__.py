"""The benchmark harness behind `ipvsproxy bench` (docs/benchmarks.md).

cluster      deterministic synthetic clusters (raw Service/EndpointSlice dicts)
scenarios    cold start, steady resync, churn, restart adoption through the agent's code
dataplanes   timing proxy and a table-less sink (for the memory probe)
rss          agent memory, measured in a fresh process
references   ipvsadm -R, ip -batch and a naive pyroute2 loop (kernel runs)
kernel       the end-to-end run inside the IPVS test VM
report       JSON, targets, text summary, plots
main         the driver (Options, run); the command is cli/bench.py (bench never imports cli)
"""
