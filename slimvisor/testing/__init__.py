"""Helpers for the test suite and the benchmarks only: driving a guest console like expect(1)
(`expect`), a cloud kernel with its modules for the QEMU tests (`cloudkernel`) and a real etcd
cluster for the pool's tests (`etcd`). Nothing else in slimvisor imports this package; it sits
above every layer."""
