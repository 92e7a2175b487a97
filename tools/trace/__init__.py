"""Block traces of real workloads: the file format (format.py), recording in the VM
(`record`, over `python -m ublk_shim loop FILE --record TRACE`), and the committed traces
(data/). Replay is `python -m tools.bench --trace FILE` (tools/bench/trace.py)."""
