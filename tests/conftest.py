"""Suite-wide settings: XLA's cheapest CPU code generation for every program the tests compile.

The suite is compile-bound: hundreds of small programs, most run once or twice on tiny shapes. These
backend options (what `compress.core.teacher_forced.fast_compile_options` gives the sweep) lower
XLA's CPU backend optimisation level and skip LLVM's expensive passes: the same HLO graph, compiled
faster, with outputs equal up to float rounding, so every tolerance stays what it is. They reach the
subprocesses the tests start (CLI runs, `eval.frontier.launch`) through the environment. XLA's defaults (what a
user runs) are kept when XLA_FLAGS already sets either option, or with VAR_TESTS_XLA_DEFAULTS=1.

Compiled programs stay in jax's caches, each XLA:CPU executable holding memory mappings: one pytest-xdist
worker that runs half the suite reached 65,183 mappings (of vm.max_map_count's 65,530) and died in
LLVM's compile (a segfault, "worker crashed"). After each test, with no compile in flight, the caches are
cleared once the worker holds more than half the limit (`eval.engine.points.free_code`, what the sweep
does between points): later tests compile again, nothing else changes.
"""
import os

_FAST = {'--xla_backend_optimization_level': '0', '--xla_llvm_disable_expensive_passes': 'true'}

if os.environ.get('VAR_TESTS_XLA_DEFAULTS') != '1':
  _flags = os.environ.get('XLA_FLAGS', '')
  if not any(name in _flags for name in _FAST):
    os.environ['XLA_FLAGS'] = ' '.join([_flags] + [f'{k}={v}' for k, v in _FAST.items()]).strip()


import pytest  # noqa: E402  (after the XLA flags: they must be set before anything imports jax)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
  """After a test's own teardown: frees compiled programs past the mapping budget (see above)."""
  del item, nextitem
  yield
  from eval.engine import points  # pylint: disable=g-import-not-at-top
  points.free_code()


@pytest.fixture(scope='session')
def tiny_frontier_run(tmp_path_factory):
  """Workdir of one uninterrupted tests/tiny_frontier.py run (eval.frontier.job.run in this process)."""
  import tiny_frontier  # pylint: disable=g-import-not-at-top
  from eval.frontier import job  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('tiny_frontier') / 'run')
  assert job.run(tiny_frontier.config(), workdir)['failed'] == []
  return workdir
