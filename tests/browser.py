"""Open a page in headless Chromium and report what loaded: images decoded, tables with rows."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Appended to a copy of the page: after `load`, count images that did not decode and tables
# without a data cell, and leave the counts in the DOM for --dump-dom to carry out.
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images], tables = [...document.querySelectorAll('table')];
  const out = document.createElement('pre'); out.id = 'dpolens-browser-check';
  out.textContent = JSON.stringify({
    images: imgs.length, broken_images: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length,
    tables: tables.length, empty_tables: tables.filter(t => t.querySelectorAll('td').length === 0).length});
  document.body.appendChild(out);
});</script>"""

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=15000", "--dump-dom"]


def browser_check(page: Path, tmp: Path) -> dict:
    copy = page.with_name(page.stem + ".browser-check.html")
    copy.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    try:
        dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}", copy.as_uri()],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    finally:
        copy.unlink()
    m = re.search(r'<pre id="dpolens-browser-check">(.*?)</pre>', dom, re.S)
    assert m, f"the check script did not run; Chromium returned {len(dom)} characters"
    return json.loads(m.group(1))
