"""The site's pages rendered from a `Site` held in memory (tracking/site.py), without an MLflow
store: why each accepted proposal is not in effect, and the empty pages. The site built from a
real store, in a browser, is test_site.py (slow)."""

from __future__ import annotations

from types import SimpleNamespace

from conftest import write_proposal

from cpm_lightning.tracking.site import PAGES, render_site
from cpm_lightning.tracking.site_data import RunData, Site
from cpm_lightning.tracking.weekly import read_proposals


def site(tmp_path, runs, ledger=()) -> Site:
    registry = tmp_path / "registry"
    write_proposal(registry, 1, {"model.optim.lr": 0.002}, kind="training")
    write_proposal(registry, 2, {"model.optim.lr": 0.003}, kind="training")  # excluded by the run
    write_proposal(registry, 3, {"model.optim.eps": 1e-7}, kind="training", effective_from_step=100)
    write_proposal(registry, 4, {"model.optim.weight_decay": 0.02}, kind="training")  # deferred
    write_proposal(registry, 5, {"model.optim.weight_decay": 0.03}, kind="training")
    write_proposal(registry, 6, {"model.optim.eps": 1e-6}, status="discussion", kind="training")
    proposals, unreadable = read_proposals(registry)
    return Site(experiment="exp", runs=runs, proposals=proposals, unreadable=unreadable, ledger=list(ledger),
                releases=[], prompts=[], apps=[], completions=[], reports={"daily": [], "weekly": []})


def built(tmp_path, s: Site) -> dict[str, str]:
    out = tmp_path / "build"
    out.mkdir()
    render_site(s, out)
    return {href: (out / href).read_text() for href, _ in PAGES}


def test_the_overview_says_why_each_accepted_proposal_is_not_in_effect(tmp_path):
    run = RunData(SimpleNamespace(info=SimpleNamespace(run_name="main", run_id="ab" * 16, status="RUNNING"),
                                  data=SimpleNamespace(tags={"cpm.proposals": "0001"})),
                  {"train/loss": [(5, 1_790_000_000_000, 2.5)], "train/tokens_seen": [(5, 1_790_000_000_000, 640.0)]})
    ledger = [(run, {"time": "t0", "step": 0, "kind": "start", "proposals": [1], "exclude": [2]}),
              (run, {"time": "t1", "step": 4, "kind": "deferred", "proposals": [4], "reason": "no migration"})]
    index = built(tmp_path, site(tmp_path, [run], ledger))["index.html"]
    assert "<h2>Proposals in effect</h2><ul><li>0001 " in index
    pending = index.partition("<h2>Pending proposals</h2>")[2].partition("</ul>")[0]
    why = {li[:4]: li.partition("</a>: ")[2].removesuffix("</li>") for li in pending.split("<li>")[1:]}
    assert why == {"0002": "accepted; this run leaves it out (registry.exclude)",
                   "0003": "accepted, effective from step 100", "0004": "deferred at step 4: no migration",
                   "0005": "accepted, not applied yet", "0006": "discussion"}
    assert "<td>main (abababab)</td><td>RUNNING</td><td>5</td><td>640</td><td>2.5000</td>" in index


def test_an_experiment_without_runs_gives_pages_that_say_so(tmp_path):
    pages = built(tmp_path, site(tmp_path, []))
    assert "Nothing yet: the experiment exp has no training run." in pages["index.html"]
    assert "Nothing yet: no run has logged a metric." in pages["metrics.html"]
    assert "No release yet." in pages["releases.html"] and '<p class="empty">None.</p>' in pages["incidents.html"]
    assert all(page.startswith("<!DOCTYPE html>") and "<title>" in page for page in pages.values())


def test_a_proposal_check_refuses_is_not_shown(tmp_path):
    # As apps.yaml's links: a discussion URL `proposals check` refuses is not a link on the site,
    # and neither is the rest of that proposal; the site counts it and points to `check`.
    s = site(tmp_path, [])
    write_proposal(tmp_path / "registry", 7, {"model.optim.lr": 0.004}, status="discussion", kind="training",
                   discussion="javascript:alert(1)", title="Unchecked")
    s.proposals, s.unreadable = read_proposals(tmp_path / "registry")
    assert [p.id for p in s.proposals] == [1, 2, 3, 4, 5, 6] and s.unreadable == 1
    page = built(tmp_path, s)["proposals.html"]
    assert "Unchecked" not in page and "javascript" not in page and "1 proposal file(s) could not be read" in page
