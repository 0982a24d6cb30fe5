"""Fuzz targets: each takes bytes, drives one parser or state machine the way a hostile peer
would, and raises only on a failure (a crash, an exception other than the documented rejection,
an access outside guest memory, a leaked fd, a broken invariant, more memory than a budget).

The same targets run three ways: under hypothesis in the test suite (tests/test_fuzz.py, bounded
so the whole step stays under three minutes), over the corpus of inputs found so far
(fuzz/corpus/TARGET/*, replayed by the suite as regression tests), and for as long as asked under
atheris where it installs (`scripts/fuzz.sh TARGET SECONDS`, hypothesis otherwise).
"""
