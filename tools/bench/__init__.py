"""Engine benchmark: SwornDisk against CryptDisk (AES-XTS in place), see README.md.

Modules: cryptdisk (the baseline disk), disks (images, counting devices, disk factories),
workloads (I/O patterns and timing), suite (the micro-benchmark), aging (random overwrites
at 50-90% utilisation), isolate (one process per disk for fair peak RSS), report (tables,
JSON), cli (argument parsing and orchestration).
"""
