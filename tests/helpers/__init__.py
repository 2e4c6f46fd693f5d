"""What tests and benches share: tiny models and corpora (``tiny``), a vLLM server on one (``serve``).

Why a package: tests import it as ``helpers`` (tests/ is on the path through conftest.py) and
benches as ``tests.helpers`` (the repository root on the path), so neither loads the other's
files by path.
"""
