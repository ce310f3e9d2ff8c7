"""One run per workdir: an OS file lock on WORKDIR/.lock, held for the run's life.

`hold(workdir)` takes an exclusive `fcntl.flock` on WORKDIR/.lock (creating both if needed) before any
work, then writes who holds it (host, pid, start time, command) into the file. The kernel releases the
lock when the process ends, however it ends (kill -9 included), so a lock is never stale: the next run
takes it and rewrites the holder. A second process that asks for it stops at once with `WorkdirBusy`,
whose one-line message names the holder and what to do. Re-entrant within a process (a run that calls
a tool taking the same lock). A workdir that `hold` created and left empty (a run that failed before
writing anything) is removed again. On a filesystem without file locks, VAR_NO_WORKDIR_LOCK=1 turns the
lock off (nothing then refuses a second run).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Iterator

from var_jax.cli import UserError

LOCK_FILE = '.lock'
OFF_ENV = 'VAR_NO_WORKDIR_LOCK'


class WorkdirBusy(UserError):
  """Another process holds the workdir's lock."""


@dataclasses.dataclass
class _Held:
  workdir: str
  fd: int
  created: bool              # `hold` created the workdir (removed again if left empty)
  depth: int = 1


_held: dict[str, _Held] = {}          # realpath of a workdir -> its lock, held by this process
_mutex = threading.Lock()


def lock_path(workdir: str) -> str:
  return os.path.join(workdir, LOCK_FILE)


def holder(workdir: str) -> dict[str, Any] | None:
  """What WORKDIR/.lock says about its (last) holder: {'host', 'pid', 'started', 'program', 'command'}; None if
  the file is absent or not written yet."""
  try:
    with open(lock_path(workdir)) as f:
      info = json.loads(f.read() or 'null')
  except (OSError, ValueError):
    return None
  return info if isinstance(info, dict) else None


def busy_message(workdir: str) -> str:
  info = holder(workdir)
  if not info:
    who = 'another process that is starting (it has not written its details yet)'
    stop = 'wait for it to end'
  else:
    here = info.get('host') == socket.gethostname()
    who = (f'{info.get("program", "another run")} (pid {info.get("pid")} on host {info.get("host")}, '
           f'started {info.get("started")})')
    stop = f'wait for it to end, or stop it (kill {info.get("pid")}{"" if here else " on " + str(info.get("host"))})'
  return (f'workdir {workdir!r} is in use by {who}; one run per workdir: {stop}, then re-run, or use '
          'another --workdir')


def _program() -> str:
  """'python -m <module>' of this process (or its script's name)."""
  main = sys.modules.get('__main__')
  name = getattr(getattr(main, '__spec__', None), 'name', None)
  return f'python -m {name.removesuffix(".__main__")}' if name else os.path.basename(sys.argv[0] or 'python')


def _open_locked(workdir: str) -> int:
  """An fd of WORKDIR/.lock holding its exclusive lock (not waiting); `WorkdirBusy` if another has it."""
  path = lock_path(workdir)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirBusy(busy_message(workdir)) from None
      raise UserError(f'cannot lock {path!r} ({e.strerror}): its filesystem has no file locks; put the '
                      f'workdir on one that has, or set {OFF_ENV}=1 (then nothing stops two runs on it)') from None
    try:                        # the file may have been replaced between open and lock (moved, removed)
      same = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  info = {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'program': _program(),
          'command': ' '.join([_program()] + sys.argv[1:])[:1000]}
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(info) + '\n').encode(), 0)
  return fd


def probe(workdir: str) -> None:
  """Raises `WorkdirBusy` if a process holds the lock of `workdir` now (takes nothing, creates nothing)."""
  if os.environ.get(OFF_ENV) == '1' or os.path.realpath(workdir) in _held:
    return
  try:
    fd = os.open(lock_path(workdir), os.O_RDONLY)
  except FileNotFoundError:
    return
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    raise WorkdirBusy(busy_message(workdir)) from None
  finally:
    os.close(fd)


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True) -> Iterator[None]:
  """Holds the lock of `workdir` (created if missing) for the `with` body; `WorkdirBusy` at once if
  another process holds it. `enabled=False`: a no-op (a process of a multi-process job whose lead
  holds the lock)."""
  if not enabled or os.environ.get(OFF_ENV) == '1':
    yield
    return
  with _mutex:
    created = not os.path.isdir(workdir)
    os.makedirs(workdir, exist_ok=True)
    key = os.path.realpath(workdir)
    if key in _held:
      _held[key].depth += 1
    else:
      try:
        _held[key] = _Held(workdir, _open_locked(workdir), created)
      except BaseException:
        if created:
          _remove_empty(workdir)
        raise
  try:
    yield
  finally:
    with _mutex:
      h = _held[key]
      h.depth -= 1
      if not h.depth:
        del _held[key]
        if h.created:                   # still holding the lock: nobody else can be using it
          _remove_empty(h.workdir)
        os.close(h.fd)


def _remove_empty(workdir: str) -> None:
  """Removes `workdir` if it holds nothing but its lock file."""
  try:
    if set(os.listdir(workdir)) <= {LOCK_FILE}:
      with contextlib.suppress(FileNotFoundError):
        os.remove(lock_path(workdir))
      os.rmdir(workdir)
  except OSError:
    pass


def renew(workdir: str) -> None:
  """After `workdir` was moved aside and made afresh (config.overwrite), takes the lock of the new
  WORKDIR/.lock if this process held the old one (a no-op otherwise)."""
  with _mutex:
    h = _held.get(os.path.realpath(workdir))
    if h is None:
      return
    try:
      if os.path.samestat(os.fstat(h.fd), os.stat(lock_path(workdir))):
        return
    except FileNotFoundError:
      pass
    fd = _open_locked(workdir)
    os.close(h.fd)
    h.fd, h.created = fd, False
