"""`vitlab report`'s page opened in a real browser: headless Chromium loads it, and a script on a test copy of
the page records what the browser made of it (tables and rows, each image's decoded width), read back from
the DOM Chromium dumps. Slow-marked; skipped where no Chromium is installed (Debian: `apt-get install
chromium`)."""
import json
import re
import shutil
import subprocess

import pytest

from conftest import run_cli
from test_experiments import family  # noqa: F401  (fixture)

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth}));
  const rows = [...document.querySelectorAll("table tr")].length;
  const headers = [...document.querySelectorAll("table th")].map(h => h.textContent.trim());
  document.body.setAttribute("data-probe", JSON.stringify({tables: document.querySelectorAll("table").length,
                                                           rows, headers, images}));
});
</script>"""


def browse(page) -> dict:
    """What Chromium saw on `page`: tables, rows, header cells, and every image's decode state."""
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    match = re.search(r'data-probe="([^"]*)"', dom)
    assert match, f"the page's script never ran; Chromium printed: {dom[:500]}"
    return json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="needs Chromium (apt-get install chromium)")
def test_report_renders_its_table_and_every_figure_in_chromium(family, tmp_path, capsys):  # noqa: F811
    page = tmp_path / "report.html"
    code, _, err = run_cli(["report", family, "--out", page, "--title", "browser check"], capsys)
    assert code == 0, err
    seen = browse(page)
    assert seen["tables"] >= 1 and seen["rows"] == 1 + 6  # a header row and the six runs
    assert {"run", "top-1 %"} <= set(seen["headers"])
    assert len(seen["images"]) >= 4
    assert all(i["complete"] and i["width"] > 0 for i in seen["images"]), seen["images"]


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="needs Chromium (apt-get install chromium)")
def test_a_broken_figure_is_caught(family, tmp_path, capsys):  # noqa: F811
    """The check can fail: a figure whose data does not decode has natural width 0."""
    page = tmp_path / "report.html"
    assert run_cli(["report", family, "--out", page], capsys)[0] == 0
    text, n = re.subn(r"src='data:image/png;base64,[^']{40}", "src='data:image/png;base64,AAAA", page.read_text(),
                      count=1)
    assert n == 1
    page.write_text(text)
    assert any(i["width"] == 0 for i in browse(page)["images"])
