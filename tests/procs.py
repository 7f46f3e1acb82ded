"""Subprocesses the tests start: run in a process group killed at the end, ports held for them.

Multi-process tests must neither leave processes behind when they fail (a launcher's children
outlive a killed launcher) nor lose their coordinator port to another program between choosing
it and binding it.
"""

import contextlib
import os
import signal
import socket
import subprocess


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


def run_group(argv, timeout: float, **kwargs) -> subprocess.CompletedProcess:
  """subprocess.run(argv, capture_output=True, text=True) in a process group of its own, all
  of which is killed when the command ends or fails to end within `timeout` seconds (a
  launcher's processes too, not only the launcher)."""
  proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **kwargs)
  try:
    out, err = proc.communicate(timeout=timeout)
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
  return subprocess.CompletedProcess(argv, proc.returncode, out, err)
