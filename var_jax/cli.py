"""Command-line entry points: a user error is one `error: ...` line on stderr and exit status 2.

Every `python -m` entry point of the project runs its main through `run` (absl flags) or `run_main`
(argparse, with this module's `ArgumentParser`). A user error (a bad flag value, a missing run, budget
or file, a corrupt or foreign checkpoint, a busy workdir) prints one line naming the problem and the
fix, and exits with status 2, without a traceback; `--debug` (or VAR_DEBUG=1 in the environment) shows
the traceback instead. Anything else (a bug) keeps its traceback.

What counts as a user error (`is_user_error`): `UserError` (raise it, or a subclass, for a failure the
user can fix), absl's flag errors and `app.UsageError`, missing / existing / wrong-kind / unwritable
paths (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError), an unsafe pickle
(`var_jax.torch_pickle.UnsafeCheckpointError`), and a ValueError raised by the project's own code (its
convention for bad input; a ValueError from inside a library, e.g. a shape error in jax, is a bug).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, NoReturn, Sequence

DEBUG_ENV = 'VAR_DEBUG'
EXIT_USER_ERROR = 2
PACKAGES = ('var_jax', 'compress', 'train', 'eval', 'configs')   # the project's own code
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TRACEBACK = 'Traceback (most recent call last):'


class UserError(ValueError):
  """A failure the user can fix; its message names the problem and the fix (one line)."""


def debug() -> bool:
  """Whether user errors show their traceback: VAR_DEBUG=1, or --debug before any `--`."""
  if os.environ.get(DEBUG_ENV, '') not in ('', '0'):
    return True
  args = sys.argv[1:]
  args = args[:args.index('--')] if '--' in args else args
  return any(a in ('--debug', '--debug=true', '--debug=True', '--debug=1') for a in args)


def _frames(e: BaseException) -> list[str]:
  """The source files of `e`'s traceback, outermost first."""
  tb, out = e.__traceback__, []
  while tb is not None:
    out.append(os.path.abspath(tb.tb_frame.f_code.co_filename))
    tb = tb.tb_next
  return out


def _raised_by_project(e: BaseException) -> bool:
  """Whether the innermost frame of `e`'s traceback is in one of `PACKAGES`."""
  frames = _frames(e)
  return bool(frames) and any(frames[-1].startswith(os.path.join(_ROOT, p) + os.sep) for p in PACKAGES)


def is_user_error(e: BaseException) -> bool:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from var_jax.torch_pickle import UnsafeCheckpointError  # pylint: disable=g-import-not-at-top
  if isinstance(e, (UserError, app.UsageError, flags.Error, FileNotFoundError, FileExistsError,
                    NotADirectoryError, IsADirectoryError, PermissionError, UnsafeCheckpointError)):
    return True
  return isinstance(e, ValueError) and _raised_by_project(e)


def one_line(message: str) -> str:
  """`message` on one line; an embedded traceback (e.g. of a config file) is cut to its last line."""
  if _TRACEBACK in message:
    head, tail = message.split(_TRACEBACK, 1)
    last = [line for line in tail.strip().splitlines() if line.strip()][-1:]
    message = f'{head.strip()} {" ".join(last)}'
  return ' '.join(p.strip() for p in message.strip().splitlines() if p.strip())


def fail(message: Any) -> NoReturn:
  """Prints `error: <message>` (one line) on stderr and exits with status 2."""
  sys.stdout.flush()
  sys.stderr.write(f'error: {one_line(str(message))}\n')
  sys.stderr.flush()
  raise SystemExit(EXIT_USER_ERROR)


def guard(main: Callable[..., Any]) -> Callable[..., Any]:
  """`main` whose user errors end the program with `fail` (unless `debug()`); others propagate."""
  def guarded(*args: Any, **kwargs: Any) -> Any:
    try:
      return main(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except  (re-raised unless a user error)
      if debug() or not is_user_error(e):
        raise
      fail(e)
  return guarded


def parse_flags(argv: Sequence[str], fv: Any = None) -> list[str]:
  """absl's flag parsing (of `fv`, default the global FLAGS), with a parse error (an unknown or
  missing flag, a bad value, a config file that does not load or an override naming no field of it)
  as one `error:` line and exit status 2."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if fv is None else fv
  prog = f'python -m {_module_name()}'
  try:
    rest = fv(list(argv))
  except flags.Error as e:
    if debug():
      raise
    fail(f'{one_line(str(e))} ({prog} --helpshort lists the flags)')
  except (AttributeError, KeyError) as e:        # a --config.<field> override naming no field
    if debug() or not any(f'{os.sep}ml_collections{os.sep}' in path for path in _frames(e)):
      raise
    msg: Any = e
    while isinstance(msg, BaseException) and msg.args:      # AttributeError(KeyError('name\nDid you mean..'))
      msg = msg.args[0]
    lines = str(msg).splitlines() or ['']
    key = lines[0].strip('"\'')
    names = [a.split('=')[0] for a in argv[1:] if a.startswith('--') and f'.{key}' in a.split('=')[0]]
    fail(f'{names[0] if names else "a --config override"} names no field of the config (no {key!r}'
         f'{"; " + " ".join(lines[1:]) if lines[1:] else ""}): check the dotted name against the config file')
  try:
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser  # pylint: disable=g-import-not-at-top
  except ImportError:
    return rest
  for name in fv:
    flag = fv[name]
    if isinstance(flag.parser, ConfigFileFlagParser):
      try:                              # ml_collections defers the error of a config file that fails to load
        getattr(flag.value, 'keys', None)
      except OSError as e:
        if debug():
          raise
        fail(f'--{name}: cannot load the config file ({e.__cause__ or e})')
  return rest


def _module_name() -> str:
  main = sys.modules.get('__main__')
  spec = getattr(main, '__spec__', None)
  name = getattr(spec, 'name', None) or os.path.basename(sys.argv[0])
  return name[:-len('.__main__')] if name.endswith('.__main__') else name


def run(main: Callable[[list[str]], Any]) -> None:
  """absl's `app.run(main)` with user errors (flags included) reported by `fail`; defines --debug."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  if 'debug' not in flags.FLAGS:
    flags.DEFINE_bool('debug', False, f'show the traceback of a user error (also {DEBUG_ENV}=1)')
  app.run(guard(main), flags_parser=parse_flags)


def run_main(main: Callable[[], Any]) -> NoReturn:
  """Runs an argparse `main()` (which parses sys.argv) with user errors reported by `fail`; exits with
  its return value when that is an int, else 0."""
  result = guard(main)()
  sys.exit(result if isinstance(result, int) else 0)


class ArgumentParser(argparse.ArgumentParser):
  """argparse with --debug, whose errors (missing or bad arguments) are `UserError`s: one line."""

  def __init__(self, *args: Any, **kwargs: Any):
    super().__init__(*args, **kwargs)
    self.add_argument('--debug', action='store_true',
                      help=f'show the traceback of a user error (also {DEBUG_ENV}=1)')

  def error(self, message: str) -> NoReturn:
    raise UserError(f'{message} (usage: {" ".join(self.format_usage().split())[len("usage: "):]})')
