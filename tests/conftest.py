"""What every test shares: per-session scratch folders in the environment, reserved ports.

Subprocesses inherit os.environ, so setting these once here reaches every command a test runs
(through `dict(os.environ, ...)`), without a fixed path that two test runs on one machine would
share:
  JAX_COMPILATION_CACHE_DIR  the persistent compilation cache of the test subprocesses: they
                             compile the same small programs again and again, and on a 2-core
                             machine compiling is most of their time
  RERANK_LOG_DIR             where launch/local_multiprocess.sh writes the logs of processes
                             1..N-1 when a test does not give its own folder
The pytest process itself imported jax while collecting, before these are set, so its own
compilations stay in memory as before.
"""

import contextlib
import socket

import pytest


@pytest.fixture(scope="session", autouse=True)
def _session_scratch(tmp_path_factory):
  values = {
      "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
      # Cache every program: most of the suite's are small but compiled by many processes.
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
      "RERANK_LOG_DIR": str(tmp_path_factory.mktemp("launch_logs")),
  }
  with pytest.MonkeyPatch.context() as mp:
    for name, value in values.items():
      mp.setenv(name, value)
    yield values


def hold_port(port: int = 0) -> socket.socket:
  """A socket bound to 127.0.0.1:port (0: a free one) that keeps the port from anyone else.

  It sets SO_REUSEPORT and never listens: jax's coordinator (a gRPC server, which sets
  SO_REUSEPORT too) can still bind the port while it is held, but no other program can take it
  between the choice and that bind, as one could after a bind-then-close probe. Raises OSError
  when the port is taken.
  """
  s = socket.socket()
  try:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
  except OSError:
    s.close()
    raise
  return s


@pytest.fixture
def reserve_port():
  """`reserve_port(port=0) -> port`: held until the test ends (see hold_port)."""
  with contextlib.ExitStack() as held:

    def reserve(port: int = 0) -> int:
      return held.enter_context(hold_port(port)).getsockname()[1]

    yield reserve
