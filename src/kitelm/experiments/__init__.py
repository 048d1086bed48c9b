"""Experiments built on the library and never imported by it: `kitelm bench` (`bench/`), `kitelm study`
(`study.py`) and `kitelm reproduce` (`reproduce/`), with one settings hierarchy (`settings.py`) and the machine
probes they share (`machine.py`: allocator, GEMM peaks, DRAM bandwidth, description)."""
