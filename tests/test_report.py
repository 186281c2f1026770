"""`jaxlm report`: the page, report.md and metrics.json of pipeline runs (tests/helpers_report.py
writes realistic runs), what is missing said rather than crashed on, escaping, and a real
headless Chromium rendering the page: images loaded, Arabic stories right to left."""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers_report import write_run

from jaxlm.cli import main
from jaxlm.errors import UserError
from jaxlm.pipeline.report import Change, Est, reading, write_report

KINDS = ("demo", "judge", "sweep")


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    """The three fixture runs and their reports, each made once through the CLI."""
    root = tmp_path_factory.mktemp("report")
    out = {}
    for kind in KINDS:
        run = write_run(root / "runs", kind)
        dest = root / "out" / kind
        assert main(["report", str(run), "--out", str(dest)]) == 0
        out[kind] = {
            "run": run,
            "out": dest,
            "results": json.loads((run / "results.json").read_text()),
        }
    return out


def _page(r: dict) -> str:
    return (r["out"] / "index.html").read_text(encoding="utf-8")


def _metrics(r: dict) -> dict:
    return json.loads((r["out"] / "metrics.json").read_text())


# --- the three fixtures render ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_fixture_renders_self_contained(reports, kind):
    r = reports[kind]
    page = _page(r)
    for title in ("Summary", "Loss curves", "Validation loss per source", "Translation artifacts",
                  "Judge scores", "SAEs: quality", "Sample stories", "Provenance"):  # fmt: skip
        assert f"<h2>{title}" in page, title
    assert ("Sweep: the paper&#x27;s table" in page) == (kind == "sweep")
    # nothing from the network, no script of its own: images are data URIs, links are relative
    assert "<script" not in page and "<link" not in page and "@import" not in page
    srcs = re.findall(r'<img src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    for href in re.findall(r'href="([^"]*)"', page):
        assert not re.match(r"^(https?:)?//", href), href
        if not href.startswith("#"):
            assert (r["out"] / html.unescape(href)).is_file(), href  # a dashboard, copied
    md = (r["out"] / "report.md").read_text(encoding="utf-8")
    for f in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (r["out"] / f).is_file(), f
    assert "## Validation loss per source" in md and "| model |" in md


def test_demo_page_has_each_part(reports):
    page, res = _page(reports["demo"]), reports["demo"]["results"]
    assert page.count('class="story" dir="rtl" lang="ar"') == 9  # 3 models x 3 stories
    assert "<th>pretrain-ts-1m (pretrain)</th><th>cpt-ts-1m (cpt)</th><th>control-ts-1m" in page
    assert page.count('href="dashboards/') == 3
    assert "the commands of each stage (demo)</summary>" in page
    cmd = res["stages"]["train cpt-ts-1m"]["commands"][0]
    assert html.escape(cmd) in page
    assert "Not in this run: judge grades for any model" in page  # the demo has no judge
    for sets in res["comparisons"]["pretrain-ts-1m -> cpt-ts-1m"]["tsea"]["sets"]:
        assert f"<td>{sets}</td>" in page
    # the ablation's first table: top - random paired story by story (the runs' own interval,
    # not MOVER's), and the name mentions that say whether names went or changed kind
    assert "<th>name mentions, English / Arabic (none; random; top)</th>" in page
    assert "151 / 2; 149 / 3; 40 / 61" in page
    assert re.search(r"with as many random features: lower \(-0\.62 \[-0\.70, -0\.55\]\); name "
                     r"mentions \(English / Arabic\) 40 / 61 with the top features, 149 / 3 with "
                     r"random ones, 151 / 2 unablated\.", page)  # fmt: skip
    # the ablation's second table: the name-slot logit difference, paired changes, top - random
    assert "Name-slot logit difference" in page and "<th>top - none</th>" in page
    assert "9.770 <span" in page or "9.770 [" in page, "the unablated logit difference"
    assert "-0.460" in page and "6888 / 6819" in page
    assert re.search(r"with the top features ablated it falls \(-0\.460 \[-0\.510, -0\.410\]\)",
                     page)  # fmt: skip
    # CE loss recovered with its interval; a source where it is not measurable says so
    assert "0.910" in page and "[0.890, 0.930]" in page
    assert page.count("0.716 (not measurable)") == 1  # only the CPT model's translated rows
    # and its pooled score, over those rows, says it is a mixture
    assert page.count("0.910 \u2020") == 1
    assert "not measurable (zero-ablating the MLP does not raise the loss there; the table " in page
    assert "cpt-ts-1m (layer 7): translated. A mixture" in page
    # where the logit difference comes from: the components, the analysed layer marked
    assert "Where the model&#x27;s own logit difference" in page and "<th>mlp 7</th>" in page
    assert "analysed layer" in page and "+6.00" in page
    assert (
        "logit difference toward English names at held-out contexts is +9.77; the analysed "
        "layer&#x27;s MLP (layer 7) writes +0.25 of it directly (3%)"
    ) in page
    assert "SAE: CE loss recovered on translated rows is not measurable" in page
    assert "[-0.054, -0.042] per token" in page
    # an SAE on every trained layer: each layer's part, their sum, the pooled error share
    assert "<th>features, all layers</th>" in page and "<th>layer 6</th>" in page
    # ... and the first table says it is the analysed layer's, the sum in the last
    assert "the features of the analysed layer&#x27;s SAE (layer 7; every layer&#x27;s" in page
    assert "+1.25" in page and "+0.84" in page and "0.21" in page
    assert (
        "SAE features&#x27; direct push toward English names, summed over the SAEs on 2 MLP "
        "layers (positive: toward English): pretrain-ts-1m +1.25, error share 0.21"
    ) in page
    assert (
        _metrics(reports["demo"])["models"]["pretrain-ts-1m"][
            "analysis.all_layers.english_name_attribution"
        ]
        == 1.25
    )


def test_judge_page_compares_and_explains_agreement(reports):
    page = _page(reports["judge"])
    assert "Paired comparisons" in page and "judge agrees with its own repeated grades" in page
    # the agreement sentence relates each difference to the judge's own noise
    assert re.search(
        r"grammar: B - A \+\d\.\d\d \[.*?\] is (smaller than|at least) the judge", page
    )
    assert "Judge scores, CPT - pretraining on 24 paired stories" in page


def test_sweep_table_one_row_per_preset(reports):
    md = (reports["sweep"]["out"] / "report.md").read_text(encoding="utf-8")
    table = md.split("## Sweep: the paper's table")[1].split("## ")[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("| ts-")]
    assert [r.split("|")[1].strip() for r in rows] == ["ts-1m", "ts-3m"]
    res = reports["sweep"]["results"]["models"]
    native = res["cpt-ts-3m"]["eval_loss"]["native"]
    lo, hi = native["ci95"]
    assert f"{native['loss']:.3f} [{lo:.3f}, {hi:.3f}]" in rows[1]
    assert "translated loss: pretrain" in table and "English-name rate: CPT" in table


# --- metrics.json -------------------------------------------------------------------------------


def test_metrics_json_holds_the_fixture_values(reports):
    res, m = reports["demo"]["results"]["models"], _metrics(reports["demo"])["models"]
    for label, rec in res.items():
        got = m[label]
        ce = rec["sae"]["eval"]["ce_loss_recovered"]
        assert got["sae.ce_loss_recovered"] == (ce["value"] if isinstance(ce, dict) else ce)
        if isinstance(ce, dict):
            assert got["sae.ce_loss_recovered.ci95"] == ce["ci95"]
        assert got["sae.kl_div"] == rec["sae"]["eval"]["kl_div"]
        assert got["sae.per_source.native.l0"] == rec["sae"]["eval"]["per_source"]["native"]["l0"]
        for k in ("english_name_attribution", "english_name_error_share",
                  "english_dialogue_attribution", "english_dialogue_error_share"):  # fmt: skip
            assert got[f"analysis.{k}"] == rec["analysis"][k]
        for k in ("top", "random", "none"):
            e = rec["ablation"][f"english_name_rate_{k}"]
            assert got[f"ablation.english_name_rate_{k}"] == e["value"]
            assert got[f"ablation.english_name_rate_{k}.ci95"] == e["ci95"]
        e = rec["ablation"]["difference_top_vs_random"]
        assert got["ablation.difference_top_vs_random"] == e["value"]
        assert got["ablation.difference_top_vs_random.ci95"] == e["ci95"]
        assert got["ablation.name_mentions.top.arabic"] == 61
        for k in ("top", "random", "none", "change_top", "change_random"):
            e = rec["ablation"][f"name_logit_diff_{k}"]
            assert got[f"ablation.name_logit_diff_{k}"] == e["value"]
            assert got[f"ablation.name_logit_diff_{k}.ci95"] == e["ci95"]
        for source, e in rec["eval_loss"].items():
            assert got[f"eval_loss.{source}"] == e["loss"]
            assert got[f"eval_loss.{source}.ci95"] == e["ci95"]
            assert got[f"eval_loss.{source}.perplexity"] == e["perplexity"]
        a = rec["artifacts"]["metrics"]["english_name_rate"]
        assert got["artifacts.english_name_rate"] == a["value"]
        assert got["artifacts.english_name_rate.ci95"] == a["ci95"]
        assert got["params"] == rec["params"] and got["train.steps"] == rec["train"]["steps"]
        assert not any(k.startswith("judge.") for k in got)  # no judge in the demo
    judge = reports["judge"]["results"]["models"]["cpt-ts-1m"]["judge"]["scores"]
    got = _metrics(reports["judge"])["models"]["cpt-ts-1m"]
    assert all(got[f"judge.{s}"] == v["value"] and got[f"judge.{s}.ci95"] == v["ci95"]
               for s, v in judge.items())  # fmt: skip


def test_metrics_json_pair_changes(reports):
    res = reports["judge"]["results"]
    pair = _metrics(reports["judge"])["comparisons"]["pretrain-ts-1m -> cpt-ts-1m"]
    before = res["models"]["cpt-ts-1m"]["eval_loss_start"]["native"]
    after = res["models"]["cpt-ts-1m"]["eval_loss"]["native"]
    d = after["loss"] - before["loss"]
    lo = d - math.sqrt(
        (after["loss"] - after["ci95"][0]) ** 2 + (before["ci95"][1] - before["loss"]) ** 2
    )
    hi = d + math.sqrt(
        (after["ci95"][1] - after["loss"]) ** 2 + (before["loss"] - before["ci95"][0]) ** 2
    )
    assert pair["eval_loss.native.change"] == pytest.approx(d)
    assert pair["eval_loss.native.change_ci95"] == pytest.approx([lo, hi])
    scores = res["comparisons"]["pretrain-ts-1m -> cpt-ts-1m"]["judge"]["comparisons"][0]["scores"]
    assert pair["judge.grammar.diff_b_minus_a"] == scores["grammar"]["diff_b_minus_a"]
    assert pair["judge.grammar.ci95"] == scores["grammar"]["ci95"]
    assert pair["tsea.english_names.after"] == 10
    assert "judge_agreement.grammar.mean_abs_diff" in pair


# --- sentences from the numbers -----------------------------------------------------------------


def test_change_interval_and_words():
    c = Change.between(Est(1.0, 0.9, 1.1), Est(0.5, 0.45, 0.6))
    assert c.d == pytest.approx(-0.5)
    assert (c.lo, c.hi) == pytest.approx(
        (-0.5 - math.hypot(0.05, 0.1), -0.5 + math.hypot(0.1, 0.1))
    )
    assert c.clear and c.words(2) == "falls (-0.50 [-0.61, -0.36])"
    same = Change.between(Est(1.0, 0.9, 1.1), Est(1.05, 0.95, 1.15))
    assert not same.clear and same.words(2).startswith("no clear change (+0.05 [")
    assert Change.between(Est(1.0), Est(2.0)).words(1) == "changes by +1.0 (no interval given)"
    # a clear change below the digits asked for gets more of them
    tiny = Change(-2.8e-5, -5.1e-5, -1.1e-5)
    assert tiny.clear and tiny.words(3) == "falls (-0.00003 [-0.00005, -0.00001])"
    assert reading("native", c) == "repair: native loss falls"
    assert reading("translated", Change(0.2, 0.1, 0.3)) == "forgetting: translated loss rises"
    assert reading("translated", same) == "no clear change"


def test_top_minus_random_is_paired_where_the_runs_kept_it():
    """The ablation's top - random: the runs' story-by-story difference when recorded; a run
    from before gets MOVER of the two rates (wider), and no mentions rather than made-up ones."""
    from jaxlm.pipeline.report import Model, Run, _mentions, _top_minus_random

    ab = {"english_name_rate_top": {"value": 0.75, "ci95": [0.73, 0.77]},
          "english_name_rate_random": {"value": 0.77, "ci95": [0.76, 0.79]}}  # fmt: skip
    run = Run(Path("."), {}, "r")
    old = Model("p", "p", run, {"ablation": ab})
    mover = _top_minus_random(old)
    assert mover is not None and mover.d == pytest.approx(-0.02)
    assert (mover.lo, mover.hi) == pytest.approx((-0.02 - math.hypot(0.02, 0.02),
                                                  -0.02 + math.hypot(0.02, 0.01)))  # fmt: skip
    assert _mentions(old) is None
    paired = {**ab, "difference_top_vs_random": {"value": -0.011, "ci95": [-0.031, 0.008]},
              "name_mentions": {"none": {"english": 4346, "arabic": 1237},
                                "top": {"english": 2197, "arabic": 709},
                                "random": {"english": 4282, "arabic": 1297}}}  # fmt: skip
    new = Model("p", "p", run, {"ablation": paired})
    c = _top_minus_random(new)
    assert c is not None and (c.d, c.lo, c.hi) == (-0.011, -0.031, 0.008)
    assert _mentions(new) == ["4346 / 1237", "4282 / 1297", "2197 / 709"]


def test_a_coverage_ablation_says_how_its_features_were_chosen_and_counts_them():
    """Tens of features per layer (a coverage pick) are counted in the table, not listed; the
    finding names the rule the pipeline recorded."""
    from jaxlm.pipeline.report import Model, Run, _ablation_findings, _features_text

    assert _features_text([3, 17]) == "3, 17"
    many = {"0": list(range(40)), "7": [5, 9]}
    assert _features_text(many) == "L0: 40 features; L7: 5, 9"
    ab = {"english_name_rate_top": {"value": 0.74, "ci95": [0.72, 0.76]},
          "english_name_rate_random": {"value": 0.77, "ci95": [0.76, 0.78]},
          "features_top": many, "selection": "the fewest carrying 80% of the layer's positive "
          "English-name part"}  # fmt: skip
    [found] = _ablation_findings([Model("p", "p", Run(Path("."), {}, "r"), {"ablation": ab})])
    assert "(42 features, at MLP layers 0, 7 at once; per layer the fewest carrying 80%" in found


def test_summary_follows_the_numbers(tmp_path, reports):
    summary = _page(reports["demo"]).split('<section id="loss">')[0]
    res = reports["demo"]["results"]["models"]
    pre, cpt = (
        res[k]["artifacts"]["metrics"]["english_name_rate"] for k in ("pretrain-ts-1m", "cpt-ts-1m")
    )

    def shown(e: dict) -> str:
        return f"{e['value']:.2f} [{e['ci95'][0]:.2f}, {e['ci95'][1]:.2f}]"

    expected = f"samples {shown(pre)} after pretraining → {shown(cpt)} after CPT: falls"
    assert f"English-name rate in {expected}" in summary
    assert "control-ts-1m (control) 1.00 [1.00, 1.00]: no clear change" in summary
    assert "repair: native loss falls" in summary and "forgetting: translated loss rises" in summary
    # the same run where CPT changed nothing: the sentence says so
    run = write_run(tmp_path, "demo")
    results = json.loads((run / "results.json").read_text())
    cpt_rec = results["models"]["cpt-ts-1m"]
    cpt_rec["artifacts"]["metrics"]["english_name_rate"] = {
        "value": 0.97,
        "ci95": [0.9, 1.0],
        "n": 16,
    }
    cpt_rec["eval_loss"]["native"] = dict(cpt_rec["eval_loss_start"]["native"])
    (run / "results.json").write_text(json.dumps(results))
    write_report([run], tmp_path / "out")
    summary = (tmp_path / "out/index.html").read_text().split('<section id="loss">')[0]
    assert "0.97 [0.90, 1.00] after CPT: no clear change (-0.03 [" in summary
    assert "native validation loss 2.310 [2.265, 2.355] before CPT → 2.310" in summary
    assert "+0.000 [-0.064, +0.064]), no clear change" in summary


# --- missing parts, bad input, escaping ---------------------------------------------------------


def test_missing_parts_are_said(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "results.json").write_text('{"format": 1}')
    write_report([bare], tmp_path / "bare-out")
    page = (tmp_path / "bare-out/index.html").read_text()
    assert "Not in this run: models" in page and "Nothing to compare yet" in page
    assert "the stages and their commands" in page and "the resolved config" in page
    assert json.loads((tmp_path / "bare-out/metrics.json").read_text())["models"] == {}

    run = write_run(tmp_path, "demo")  # a run whose files went missing or are malformed
    res = json.loads((run / "results.json").read_text())
    (run / "models/cpt-ts-1m/metrics.jsonl").unlink()
    (run / "samples/control-ts-1m.jsonl").unlink()
    (run / "analysis/tsea-pretrain-cpt/tsea_compare.png").unlink()
    shutil.rmtree(run / "analysis/dashboards-cpt-ts-1m")
    with open(run / "models/pretrain-ts-1m/metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": \n[1, 2]\n')
    res["stages"]["sae"]["status"] = "failed"
    res["models"]["control-ts-1m"]["eval_loss"] = "oops"
    res["models"]["control-ts-1m"]["artifacts"]["metrics"]["english_name_rate"] = {"value": None}
    res["models"]["pretrain-ts-1m"]["sae"] = None
    res["comparisons"]["pretrain-ts-1m -> cpt-ts-1m"]["tsea"]["sets"] = ["not", "a", "dict"]
    res["models"]["ghost"] = "not a model"
    (run / "results.json").write_text(json.dumps(res))
    write_report([run], tmp_path / "out")
    page = (tmp_path / "out/index.html").read_text()
    said = json.loads((tmp_path / "out/metrics.json").read_text())["missing"]
    for text in ("cpt-ts-1m's training metrics", "control-ts-1m's samples", "TSEA plot",
                 "cpt-ts-1m's feature dashboards", "validation losses for control-ts-1m",
                 "SAE evaluation for pretrain-ts-1m", "TSEA counts"):  # fmt: skip
        assert any(text in s for s in said), text
        assert text in html.unescape(page), text
    assert "2 malformed line(s) skipped" in page and "failed: sae" in page
    assert "cpt-ts-1m's loss plot" not in page  # the trainer's PNG stands in for the metrics
    assert page.count('class="story"') == 6  # the control's samples are gone


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 2
    assert "results.json: not found" in capsys.readouterr().err
    (tmp_path / "run/results.json").write_text("{torn")
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not valid JSON" in err and len(err.strip().splitlines()) == 1


def _bare(d: Path, results: dict) -> Path:
    """A run directory holding only a results.json (a run that has just started)."""
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(results))
    return d


def test_rerun_is_done_other_results_refused_overwrite_replaces(tmp_path):
    run = _bare(tmp_path / "run", {"format": 1, "name": "sweep"})
    paths = write_report([run], tmp_path / "out")
    stamp = paths["html"].stat().st_mtime_ns
    assert write_report([run], tmp_path / "out")["html"].stat().st_mtime_ns == stamp  # up to date
    (run / "results.json").write_text(json.dumps({"format": 1, "name": "sweep-2"}))
    with pytest.raises(UserError, match="--overwrite"):
        write_report([run], tmp_path / "out")
    assert "sweep-2" not in paths["html"].read_text()  # nothing changed
    write_report([run], tmp_path / "out", overwrite=True)
    assert "jaxlm report: sweep-2" in paths["html"].read_text()


def test_text_is_escaped(tmp_path, reports):
    page = _page(reports["demo"])
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in page and "<script>" not in page
    md = (reports["demo"]["out"] / "report.md").read_text()
    assert "&lt;script>window.__pwned" in md
    name = 'x"><img src=x onerror=alert(1)>'
    stages = {"corpus": {"commands": ["echo '<b>bold</b>' | cat"], "status": "done"}}
    models = {"<i>m</i>": {"role": "pretrain", "preset": "ts-1m"}}
    run = _bare(tmp_path / "run", {"name": name, "stages": stages, "models": models})
    write_report([run], tmp_path / "out")
    page = (tmp_path / "out/index.html").read_text()
    assert "<img src=x" not in page and "<b>bold" not in page and "<i>m" not in page
    assert "x&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;i&gt;m&lt;/i&gt;" in page
    md = (tmp_path / "out/report.md").read_text()
    assert "<img" not in md and "<i>" not in md
    assert "```\n# corpus\necho '<b>bold</b>' | cat\n```" in md  # a code block shows it as is


def test_two_runs_in_one_report(tmp_path):
    cpt = {"role": "cpt", "preset": "ts-1m", "parent": "pretrain-ts-1m"}
    models = {"pretrain-ts-1m": {"role": "pretrain", "preset": "ts-1m"}, "cpt-ts-1m": cpt}
    a = _bare(tmp_path / "a", {"name": "demo", "models": models})
    b = _bare(tmp_path / "b", {"name": "demo", "models": models})
    write_report([a, b], tmp_path / "out")
    m = json.loads((tmp_path / "out/metrics.json").read_text())
    # labels two runs share carry the run's name (made unique); parents stay within their run
    assert sorted(m["models"]) == ["demo (2)/cpt-ts-1m", "demo (2)/pretrain-ts-1m",
                                   "demo/cpt-ts-1m", "demo/pretrain-ts-1m"]  # fmt: skip
    assert sorted(m["comparisons"]) == ["demo (2)/pretrain-ts-1m -> demo (2)/cpt-ts-1m",
                                        "demo/pretrain-ts-1m -> demo/cpt-ts-1m"]  # fmt: skip


# --- a real browser -----------------------------------------------------------------------------

PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images], stories = [...document.querySelectorAll(".story")];
  document.body.setAttribute("data-probe", JSON.stringify({
    images: imgs.length,
    broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).length,
    stories: stories.length,
    rtl: stories.filter(s => getComputedStyle(s).direction === "rtl").length,
    overflowing: stories.filter(s => s.scrollWidth > s.clientWidth + 1).length,
    pwned: typeof window.__pwned,
    sections: document.querySelectorAll("section").length,
  }));
});
</script></body>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("environment: no chromium here (`make test` installs Debian's: "
                "apt-get install -y chromium)")  # fmt: skip


def _headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={profile}", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind", KINDS)
def test_browser_renders_images_and_rtl(reports, kind, tmp_path):
    browser, out = _chromium(), reports[kind]["out"]
    shot = tmp_path / f"{kind}.png"
    r = _headless(browser, tmp_path / "p1", f"--screenshot={shot}", "--window-size=1280,4000",
                  (out / "index.html").as_uri())  # fmt: skip
    assert shot.is_file(), r.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1280, 4000)
    assert img.getextrema()[0] < 100  # text and plots drawn, not a blank page
    probe = out / "probe.html"  # beside index.html: the same relative paths
    probe.write_text(_page(reports[kind]).replace("</body>", PROBE), encoding="utf-8")
    r = _headless(browser, tmp_path / "p2", "--virtual-time-budget=10000", "--dump-dom",
                  probe.as_uri())  # fmt: skip
    found = re.search(r'data-probe="([^"]*)"', r.stdout)
    assert found, r.stderr[-2000:]
    got = json.loads(html.unescape(found.group(1)))
    n_models = len(reports[kind]["results"]["models"])
    assert got["images"] >= 3 and got["broken"] == 0
    assert got["stories"] == 3 * n_models and got["rtl"] == got["stories"]
    assert got["overflowing"] == 0  # the stories wrap inside their columns
    assert got["pwned"] == "undefined"  # the story's <script> stayed text
    assert got["sections"] >= 10


def _junk(obj, depth: int, value):
    """`obj` with every value `depth` levels down replaced by `value`."""
    if not isinstance(obj, dict):
        return obj
    if depth == 1:
        return dict.fromkeys(obj, value)
    return {k: _junk(v, depth - 1, value) for k, v in obj.items()}


@pytest.mark.parametrize("value", [[1, "x"], "x", 3.5, None, {"value": "x", "ci95": "y"}])
def test_wrong_types_anywhere_are_said_not_crashed_on(tmp_path, value):
    """Every value at each depth replaced by something of the wrong type: the page is written
    (what cannot be read counts as missing), never a traceback. The deep levels (estimates'
    fields, which still leave most plots to draw: slow) with one wrong type only."""
    run = write_run(tmp_path, "judge")
    results = json.loads((run / "results.json").read_text())
    for depth in (1, 2, 3, 4, 5, 6) if value == [1, "x"] else (1, 2, 3, 4):
        (run / "results.json").write_text(json.dumps(_junk(results, depth, value)))
        paths = write_report([run], tmp_path / f"out{depth}")
        assert "<h2>Summary</h2>" in paths["html"].read_text()
        assert json.loads(paths["metrics"].read_text())["format"] == 1


def test_odd_structure(tmp_path):
    """Parents that loop, a comparison of unknown models, a CPT without a pretrained parent."""
    models = {
        "a": {"role": "cpt", "parent": "b", "eval_loss": {"native": {"loss": 1.0}}},
        "b": {"role": "cpt", "parent": "a", "eval_loss_start": {"native": {"loss": 2.0}}},
        "self": {"role": "control", "parent": "self", "train": {"steps": 5}},
        "orphan": {"role": "cpt", "parent": "gone"},
    }
    comparisons = {"x -> y": {"judge": {"scores": {}}}, "no arrow": {}}
    run = _bare(tmp_path / "run", {"models": models, "comparisons": comparisons})
    paths = write_report([run], tmp_path / "out")
    assert "Nothing to compare yet" in paths["html"].read_text()
    pairs = json.loads(paths["metrics"].read_text())["comparisons"]
    assert list(pairs) in (["a -> b"], ["b -> a"])  # the loop cut once; no self pair
