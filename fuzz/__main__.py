"""`python -m fuzz TARGET SECONDS`: fuzz one target for a while, under atheris (coverage-guided)
where it is installed, else under hypothesis; inputs that fail are saved into fuzz/corpus/TARGET/
and replayed by the test suite from then on."""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
import tempfile
import time
import traceback

from fuzz.targets import CORPUS, TARGETS, Target, corpus, run_measured


def save(name: str, data: bytes) -> str:
    path = CORPUS / name / hashlib.sha1(data).hexdigest()[:16]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def with_atheris(name: str, target: Target, seconds: int) -> None:
    import atheris  # type: ignore[import-not-found,unused-ignore]

    def one(data: bytes) -> None:
        try:
            run_measured(target, data)
        except BaseException:
            print(f"saved {save(name, data)}", file=sys.stderr)
            raise

    work = tempfile.mkdtemp(prefix=f"slimvisor-fuzz-{name}-")  # libFuzzer grows this corpus
    for path in corpus(name):
        shutil.copy(path, work)
    atheris.instrument_all()  # coverage of slimvisor's Python code guides the mutations
    argv = [sys.argv[0], f"-max_total_time={seconds}", "-rss_limit_mb=2048", "-timeout=10",
            f"-artifact_prefix={work}/", work]  # fmt: skip
    try:
        atheris.Setup(argv, one)
        atheris.Fuzz()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def with_hypothesis(name: str, target: Target, seconds: int) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    deadline = time.monotonic() + seconds
    rounds = 0
    found: list[bytes] = []  # the last failing input: after shrinking, the smallest
    while time.monotonic() < deadline:

        @settings(max_examples=500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(st.binary(max_size=4096))
        def run(data: bytes) -> None:
            try:
                run_measured(target, data)
            except BaseException:
                found[:] = [data]
                raise

        try:
            run()
        except Exception:
            traceback.print_exc()
            print(f"saved {save(name, found[0])}", file=sys.stderr)
            raise SystemExit(1) from None
        rounds += 1
    print(f"{name}: {rounds * 500} inputs under hypothesis, no failure")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in TARGETS or not argv[1].isdigit():
        print(f"usage: python -m fuzz TARGET SECONDS (targets: {', '.join(TARGETS)})", file=sys.stderr)
        return 2
    logging.disable(logging.CRITICAL)  # a guest error is logged once per device: noise here
    name, seconds = argv[0], int(argv[1])
    try:
        import atheris  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        with_hypothesis(name, TARGETS[name], seconds)
    else:
        with_atheris(name, TARGETS[name], seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
