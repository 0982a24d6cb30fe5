"""Helpers for the test suite and the benchmarks only: driving a guest console like expect(1)
(`expect`), a cloud kernel with its modules for the QEMU tests (`cloudkernel`), a real etcd
cluster (`etcd`) and hosts as network namespaces on one bridge (`netns`) for the pool's tests and
bench. Nothing else in slimvisor imports this package; it sits
above every layer."""
