"""Helpers for the test suite and the benchmarks only: driving a guest console like expect(1)
(`expect`) and a cloud kernel with its modules for the QEMU tests (`cloudkernel`). Nothing else in
slimvisor imports this package; it sits above every layer."""
