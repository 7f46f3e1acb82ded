"""Optional dependencies in tests: skipped without them, a failure when CI says they must be there."""

import os

import pytest


def require(module: str):
  """Imports an optional module; skips without it, fails when RERANK_REQUIRE_OPTIONAL is set."""
  try:
    return __import__(module)
  except ImportError:
    if os.environ.get("RERANK_REQUIRE_OPTIONAL"):
      pytest.fail(f"{module} is required (RERANK_REQUIRE_OPTIONAL is set): pip install -e '.[torch]'")
    pytest.skip(f"needs {module} (pip install -e '.[torch]')")
