"""Screenshot of TensorBoard's first screen for a logdir (headless Chromium; a script, not a test).

  python -m eval.report.tb runs/frontier        # (re)build runs/frontier/tb from the tables if needed
  python -m eval.report.tb_screenshot runs/frontier/tb docs/tensorboard.png

Starts TensorBoard on 127.0.0.1 (a free port), waits until it serves the logdir's scalars, loads
--page (default `/?smoothing=0&runColorGroup=regex:^([^/]+)#timeseries`: no smoothing, one colour per
family) in headless Chromium with a fresh profile, stops TensorBoard and writes the PNG (palette-quantised
to stay small). The page goes through a loopback proxy that puts --settings (TensorBoard's settings as
its Settings pane keeps them in the browser; default: `ignoreOutliers` off, no step selector, cards at
least 560 px wide, the pane closed) in the page's localStorage before TensorBoard starts; --settings '{}'
shows a new user's defaults. `forceSVG=true` is added to the URL: headless Chromium draws no WebGL
lines. Needs `chromium` (Debian: apt-get install -y chromium) or --browser.
"""
from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from PIL import Image

from var_jax import cli

PAGES = {'timeseries': '/?smoothing=0&runColorGroup=regex:^([^/]%2B)#timeseries',
         'scalars': '/#scalars&_smoothingWeight=0', 'images': '/#images'}
SETTINGS = {'ignoreOutliers': False, 'scalarSmoothing': 0, 'timeSeriesSettingsPaneOpened': False,
            'stepSelectorEnabled': False, 'timeSeriesCardMinWidth': 560}
STORAGE_KEY = '_tb_global_settings'      # where TensorBoard's Settings pane keeps them (localStorage)
BROWSERS = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _get_json(url: str) -> object:
  with urllib.request.urlopen(url, timeout=10) as r:
    return json.loads(r.read())


def wait_ready(proc: subprocess.Popen, base: str, timeout_s: float) -> dict:
  """Scalar tags of every run once two polls agree (TensorBoard loads the logdir in the background)."""
  deadline, last = time.time() + timeout_s, None
  while time.time() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f'tensorboard exited with {proc.returncode}')
    try:
      tags = _get_json(f'{base}/data/plugin/scalars/tags')
      if tags and tags == last:
        return tags
      last = tags
    except OSError:
      pass
    time.sleep(1)
  raise TimeoutError(f'tensorboard at {base} did not serve scalars within {timeout_s:.0f} s')


def settings_proxy(upstream: str, settings: dict) -> http.server.ThreadingHTTPServer:
  """Loopback proxy to `upstream` whose index.html first stores `settings` in localStorage."""
  script = (f'<script>localStorage.setItem({json.dumps(STORAGE_KEY)}, '
            f'{json.dumps(json.dumps(settings))});</script>').encode()

  class Handler(http.server.BaseHTTPRequestHandler):
    def _forward(self):
      body = self.rfile.read(int(self.headers.get('Content-Length') or 0)) or None
      headers = {k: v for k, v in self.headers.items() if k.lower() in ('content-type', 'accept')}
      req = urllib.request.Request(upstream + self.path, data=body, headers=headers, method=self.command)
      try:
        with urllib.request.urlopen(req, timeout=60) as r:
          status, head, data = r.status, r.headers, r.read()
      except urllib.error.HTTPError as e:
        status, head, data = e.code, e.headers, e.read()
      if self.path.split('?')[0] in ('/', '/index.html') and status == 200 and settings:
        data = data.replace(b'<head>', b'<head>' + script, 1)
      self.send_response(status)
      for k in ('Content-Type', 'Content-Encoding'):
        if head.get(k):
          self.send_header(k, head[k])
      self.send_header('Content-Length', str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    do_GET = do_POST = _forward

    def log_message(self, *args):  # pylint: disable=unused-argument
      pass

  server = http.server.ThreadingHTTPServer(('127.0.0.1', free_port()), Handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server


def screenshot(url: str, out: str, width: int, height: int, budget_ms: int, browser: str) -> None:
  profile = tempfile.mkdtemp(prefix='tb_screenshot_')
  try:
    cmd = [browser, '--headless', '--disable-gpu', '--no-sandbox', '--hide-scrollbars', '--no-first-run',
           f'--user-data-dir={profile}', f'--window-size={width},{height}',
           f'--virtual-time-budget={budget_ms}', f'--screenshot={os.path.abspath(out)}', url]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
  finally:
    shutil.rmtree(profile, ignore_errors=True)


def with_query(page: str, extra: str) -> str:
  """`page` ('/path?query#fragment') with `extra` added to its query."""
  path, hash_, fragment = page.partition('#')
  return f'{path}{"&" if "?" in path else "?"}{extra}{hash_}{fragment}'


def shrink(path: str, colours: int = 128) -> None:
  """Palette PNG (a screenshot of flat UI colours loses nothing visible)."""
  img = Image.open(path).convert('RGB')
  img.quantize(colours, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main(argv: list[str] | None = None) -> None:
  ap = cli.ArgumentParser(prog='python -m eval.report.tb_screenshot', description=__doc__.split('\n', 1)[0])
  ap.add_argument('logdir')
  ap.add_argument('out', help='PNG to write')
  ap.add_argument('--page', default='timeseries', help=f'one of {sorted(PAGES)} or /path?query#fragment')
  ap.add_argument('--settings', default=json.dumps(SETTINGS),
                  help='JSON of TensorBoard settings put in localStorage ({} = a new user\'s defaults)')
  ap.add_argument('--window', default='1400,1000', help='browser window WIDTH,HEIGHT')
  ap.add_argument('--budget_ms', type=int, default=20000, help='virtual time Chromium gives the page')
  ap.add_argument('--browser', default=None, help='Chromium binary (default: the first of %s on PATH)'
                  % ', '.join(BROWSERS))
  ap.add_argument('--timeout_s', type=float, default=120)
  args = ap.parse_args(argv)
  if not os.path.isdir(args.logdir):
    raise NotADirectoryError(f'{args.logdir} is not a directory (build it: python -m eval.report.tb WORKDIR)')
  browser = args.browser or next((b for b in BROWSERS if shutil.which(b)), None)
  if not browser:
    raise cli.UserError('no Chromium found: apt-get update && apt-get install -y chromium (or --browser)')
  width, height = (int(v) for v in args.window.split(','))
  port = free_port()
  base = f'http://127.0.0.1:{port}'
  proc = subprocess.Popen([sys.executable, '-m', 'tensorboard.main', '--logdir', args.logdir, '--host',
                           '127.0.0.1', '--port', str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  proxy = None
  try:
    tags = wait_ready(proc, base, args.timeout_s)
    proxy = settings_proxy(base, json.loads(args.settings))
    page = with_query(PAGES.get(args.page, args.page), 'forceSVG=true')
    screenshot(f'http://127.0.0.1:{proxy.server_address[1]}{page}', args.out, width, height,
               args.budget_ms, browser)
  finally:
    if proxy is not None:
      proxy.shutdown()
      proxy.server_close()
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
  shrink(args.out)
  print(f'{args.out}: {os.path.getsize(args.out) // 1024} KiB, {len(tags)} runs, page {page}')


if __name__ == '__main__':
  cli.run_main(main)
