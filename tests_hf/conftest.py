"""The ``hf_common`` tier: transformers' generic tests against CGNS (``make test-hf``).

The transformers test files are not part of this repository: ``tests_hf/fetch_transformers_tests.py``
(run by ``make test-hf``) fetches them from the transformers sdist into ``.hf_tests/``.
"""
import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEST = os.environ.get("CGNS_HF_TESTS_DIR", os.path.join(ROOT, ".hf_tests"))
if not os.path.isfile(os.path.join(DEST, "transformers_tests", "VERSION")):
    raise pytest.UsageError(f"the hf_common tier needs transformers' test files in {DEST}: run `make test-hf` "
                            f"(or `python tests_hf/fetch_transformers_tests.py`) first")
for path in (os.path.join(DEST, "site"), DEST, os.path.join(ROOT, "tests"), ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.hf_common)


def pytest_configure(config):
    # markers used by transformers' test files
    for name in ("flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test", "generate",
                 "is_training_test", "is_tensor_parallel_test"):
        config.addinivalue_line("markers", f"{name}: transformers test marker")
