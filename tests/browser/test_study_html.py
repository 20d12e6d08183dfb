"""HTML renders of executed notebooks, opened from file:// in headless Chromium."""

from __future__ import annotations

import re

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

BROKEN_IMAGES = """() => [...document.images]
    .filter(img => !(img.complete && img.naturalWidth > 0))
    .map(img => img.alt || img.src.slice(0, 80))"""


def test_study_html_shows_figures_and_feature_cards(page, smoke_run, save_screenshot):
    _open_offline(page, smoke_run / "topk_grid.html")
    figures = page.locator("img[src^='data:image/png']")
    assert figures.count() >= 3, "heatmaps, Pareto frontier and training curves"
    _check_visible(figures)
    assert page.evaluate(BROKEN_IMAGES) == []
    cards = page.locator(".saelib-card")  # the "explore the features" section, if any
    _check_cards(cards)
    assert save_screenshot("study_html")[0].stat().st_size > 10_000
    if cards.count():
        cards.first.evaluate("element => element.scrollIntoView({block: 'start'})")
        save_screenshot("study_html_cards", full_page=False)


def test_report_render_hides_code_and_keeps_figures_and_results(page, smoke_run, save_screenshot):
    _open_offline(page, smoke_run / "topk_grid.report.html")
    assert page.locator(".jp-CodeCell .jp-InputArea").count() == 0, "no code is shown"
    assert page.locator(".jp-MarkdownCell").count() > 0, "the text stays"
    figures = page.locator("img[src^='data:image/png']")
    full = smoke_run / "topk_grid.html"
    assert figures.count() == full.read_text().count('src="data:image/png'), "every figure stays"
    _check_visible(figures)
    assert page.evaluate(BROKEN_IMAGES) == []
    text = page.locator("body").inner_text()
    assert "PosixPath(" not in text and "<Figure size" not in text, "no helper return values"
    assert "In [" not in text and "Out[" not in text, "no prompts"
    assert page.locator("table").count() > 0, "result tables stay"
    assert save_screenshot("study_report_html")[0].stat().st_size > 10_000


def test_explorer_html_shows_feature_cards(page, explorer_notebook_run, save_screenshot):
    _open_offline(page, explorer_notebook_run.with_suffix(".html"))
    cards = page.locator(".saelib-card")
    assert cards.count() == 8, "4 static cards for each of the 2 SAEs"
    _check_cards(cards)
    assert page.evaluate(BROKEN_IMAGES) == []  # the cards' histograms
    heading = page.get_by_role("heading", name="Feature cards")
    heading.evaluate("element => element.scrollIntoView({block: 'start'})")
    save_screenshot("explorer_html_cards", full_page=False)


def _open_offline(page, path) -> None:
    """Open a file:// page with every http(s) request refused, as an offline viewer would."""
    page.route(re.compile(r"^https?://"), lambda route: route.abort())
    page.goto(path.as_uri(), wait_until="domcontentloaded")
    page.wait_for_function("() => [...document.images].every(img => img.complete)")


def _check_visible(elements) -> None:
    for index in range(elements.count()):
        elements.nth(index).scroll_into_view_if_needed()
        assert elements.nth(index).is_visible(), f"element {index} is hidden"
    elements.page.evaluate("window.scrollTo(0, 0)")


def _check_cards(cards) -> None:
    _check_visible(cards)
    for index in range(cards.count()):
        card = cards.nth(index)
        assert card.locator(".saelib-card-id").inner_text().startswith("Latent ")
        assert card.locator(".saelib-card-toks").count() > 0, "examples or token lists"
