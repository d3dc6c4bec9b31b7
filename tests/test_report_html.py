"""The run report: numbers match results.json; the self-contained HTML renders in a real headless browser."""

import json
import os
import re
import shutil
import subprocess

import pytest

from sparseforge.cli import main
from sparseforge.recipe import Recipe, RecipeRunner
from recipe_util import recipe_toml

RECIPE = recipe_toml("""
[[stage]]
method = "finetune"
epochs = 1
[[stage]]
method = "pattern"
connectivity = "3.6x"
[[stage]]
method = "compile"
batches = [1, 2]
runs = 5
[[stage]]
method = "robustness"
eps = [0.1, 1.0]
samples = 16
perturbations = 2
""", threads=2)


def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    if os.environ.get("CI"):
        pytest.fail("CI must provide a headless browser (.ci/run installs Debian's chromium)")
    pytest.skip("no chromium on this machine (CI installs it)")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("html")
    rp = d / "r.toml"
    rp.write_text(RECIPE)
    RecipeRunner(Recipe.load_file(rp), d / "run", log=lambda s: None, progress=False).run()
    return d / "run"


def test_report_numbers_match_results_json(run_dir):
    res = json.loads((run_dir / "results.json").read_text())
    md = (run_dir / "report.md").read_text()
    assert f"{res['final']['acc']:.2f}%" in md and f"{res['start']['acc']:.2f}%" in md
    lat = res["stages"][2]["latency"]
    for b, arms in lat.items():
        for arm, r in arms.items():
            assert f"| {b} | {arm} | {r['median_ms']:.3f} |" in md
    assert "ops run as generated kernels" in md and "![Per-op engine time]" in md
    rob = res["stages"][3]["lipschitz"]
    assert set(rob) == {"dense start", "compressed"}
    for e, v in rob["compressed"].items():
        assert f"| {e} | {rob['dense start'][e]:.4f} | {v:.4f} |" in md


@pytest.mark.slow
def test_html_renders_in_headless_chromium_and_every_image_loads(run_dir):
    browser = _browser()
    html = (run_dir / "report.html").read_text()
    n_img = len(re.findall(r"<img ", html))
    assert n_img >= 4 and "data:image/png;base64," in html and 'src="' in html
    assert not re.search(r'<img [^>]*src="(?!data:)', html)          # self-contained
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                        "--dump-dom", (run_dir / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f'data-images="{n_img}/{n_img}"' in r.stdout, r.stdout[:500]
    assert r.stdout.count('data-loaded="1"') == n_img
    assert "<table>" in r.stdout and "Measured latency" in r.stdout


def test_report_command_compares_runs(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir), str(run_dir), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    res = json.loads((run_dir / "results.json").read_text())
    row = f"| run | smallcnn | {res['start']['acc']:.2f}% | {res['final']['acc']:.2f}% |"
    assert out.count(row) == 2 and (tmp_path / "cmp.html").exists()
