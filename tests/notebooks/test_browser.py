"""Real-browser test: JupyterLab + chromium run the notebooks' cells and draw their widgets.

Headless nbclient runs (test_notebooks.py) prove the Python side; only a browser proves that the widget
front-ends (ipywidgets, plotly's FigureWidget through anywidget) load and render. Saved widget state is not
re-drawn when a notebook is merely opened, so the cells are executed in the page (Run > Run All Cells).

Needs Debian's chromium (/usr/bin/chromium) and the PyPI package playwright (never `playwright install`: it
downloads a browser). Without them the test is skipped, except under CI (env CI set), where it fails.

Layout tests run views in a 1000 px wide window (about 820 px of output area) and check them from the browser's
own boxes (LAYOUT_PROBLEMS_JS): the ZeroShotPanel and the TokenGrid (no overlapping columns, the Apply button on
screen, comma-separated class names giving one bar each), then the training dashboard, the generation explorer,
the unified chat, the reconstruction viewer and the codebook view (nothing cut, overlapping or outside; colour bars
with ticks; the busy-kernel note hidden when idle, shown when busy). The last test presses Run All, then ■ during a
training cell: one line, and the queued cell does not run.

Artifacts: full-window screenshots in tests/artifacts/ (git-ignored). With UNITOK_UPDATE_SCREENSHOTS=1 (or when
they are missing) they are also copied to docs/screenshots/quickstart.png and dashboard.png for the README.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
ARTIFACTS = ROOT / "tests" / "artifacts"
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUN_TIMEOUT_S = float(os.environ.get("UNITOK_BROWSER_TIMEOUT_S", 420))         # Run All Cells in smoke mode (a shared 2-core machine can be slow)

# A traceback as JupyterLab renders it (error outputs are drawn by the stderr renderer), not a mere warning.
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\s*\w+(Error|Exception)\b.*(-{3,}|\n)", re.M)


def _needs(ok: bool, what: str) -> None:
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{what} - CI must provide it (see .ci/run)")
        pytest.skip(f"{what}; install it to run the real-browser test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on notebooks/ with UNITOK_SMOKE=1, isolated settings and autosave off.

    Yields (base_url, token). The stored notebooks are restored byte for byte afterwards, whatever happens in the
    page (a save would otherwise write outputs into them).
    """
    _needs(CHROMIUM.exists(), f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _needs(False, "the playwright package is missing (pip install playwright)")
    if not (ROOT / "data" / "tiny-shapes" / "model.safetensors").is_file():
        pytest.fail("data/tiny-shapes (the bundled checkpoint) is missing: run `make checkpoint`")

    home = tmp_path_factory.mktemp("jupyter")
    settings = home / "settings"
    for plugin, values in {
        "@jupyterlab/docmanager-extension/plugin": {"autosave": False},             # never write outputs back
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    }.items():
        path = settings / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    stored = {p: p.read_bytes() for p in NOTEBOOKS.glob("*.ipynb")}
    had_checkpoints = (NOTEBOOKS / ".ipynb_checkpoints").exists()

    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, UNITOK_SMOKE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), PYTHONUNBUFFERED="1")
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={NOTEBOOKS}", "--ServerApp.open_browser=False"]
        + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),   # CI containers run as root
        cwd=NOTEBOOKS, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not answer on {base}:\n{(home / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        for path, content in stored.items():
            if path.read_bytes() != content:
                path.write_bytes(content)
        if not had_checkpoints:
            shutil.rmtree(NOTEBOOKS / ".ipynb_checkpoints", ignore_errors=True)


@pytest.fixture(scope="module")
def browser(lab, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")   # a new, empty user data dir
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1500})
        try:
            yield context
        finally:
            context.close()


def _open_and_run_all(context, lab, name: str, viewport: dict | None = None):
    """Open notebooks/<name> in a fresh page (of `viewport` size, default the context's), run all cells, wait
    until every code cell has run. -> page."""
    base, token = lab
    page = context.new_page()
    if viewport:
        page.set_viewport_size(viewport)
    page.set_default_timeout(60_000)
    page.goto(f"{base}/lab/tree/{name}?reset&token={token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    try:
        _poll(page, lambda: _kernel_state(lab, name) == "idle", 120, "the notebook's kernel to start")
        page.wait_for_timeout(1000)                          # let the page's websocket catch up with the server
        page.keyboard.press("Control+b")                     # hide the file browser: more room for the notebook
        for attempt in range(2):                             # a click on a menu still being built can be lost
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
            try:
                _poll(page, lambda: page.evaluate(_ANY_STARTED_JS), 30, "the first cell to start")
                break
            except TimeoutError:
                if attempt:
                    raise
        _poll(page, lambda: page.evaluate(_ALL_RAN_JS) and _kernel_state(lab, name) == "idle", RUN_TIMEOUT_S,
              "every cell to run")
    except Exception as error:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"failed_{Path(name).stem}.png"))
        prompts = page.eval_on_selector_all(".jp-CodeCell .jp-InputArea-prompt", "els => els.map(e => e.textContent)")
        errors = _errors(page)
        page.close()
        raise AssertionError(f"{name}: {error}; prompts {prompts}; errors {errors}; screenshot in {ARTIFACTS}")
    return page


def _scratch_notebook(name: str, cells: list) -> Path:
    """notebooks/<name> with one code cell per source in `cells` (the caller removes it when done)."""
    import nbformat

    path = NOTEBOOKS / name
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    nbformat.write(nb, path)
    return path


def _kernel_state(lab, name: str):
    """The server's view of the notebook's kernel: "starting", "idle", "busy", ... or None (no session yet)."""
    base, token = lab
    with urllib.request.urlopen(f"{base}/api/sessions?token={token}", timeout=10) as response:
        sessions = json.load(response)
    states = [s["kernel"]["execution_state"] for s in sessions if s.get("path", "").endswith(name) and s.get("kernel")]
    return states[0] if states else None


_ANY_STARTED_JS = """() => [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]
    .some(p => /^\\[(\\*|\\d+)\\]:$/.test(p.textContent.trim()))"""
_ALL_RAN_JS = """() => {
    const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent.trim());
    return prompts.length > 0 && prompts.every(t => /^\\[\\d+\\]:$/.test(t));
}"""


def _poll(page, condition, timeout_s: float, what: str) -> None:
    """Wait until condition() holds, accepting a "Select Kernel" dialog (the default kernel) if one shows."""
    deadline = time.monotonic() + timeout_s
    while True:
        dialog = page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept")
        if dialog.count():
            dialog.first.click()
        if condition():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        page.wait_for_timeout(1000)


def _errors(page) -> list[str]:
    """Texts of error outputs and of stderr outputs that hold a traceback (warnings alone are fine)."""
    texts = page.eval_on_selector_all(
        '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"], '
        '.jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]',
        "els => els.map(e => e.innerText)")
    found = [t for t in texts if TRACEBACK.search(t)]
    widget_errors = page.locator(".jupyter-widgets", has_text="Error displaying widget")
    found += [f"widget failed to render: {t}" for t in widget_errors.all_inner_texts()]
    return found


def _screenshot(page, locator, stem: str, docs_name: str) -> Path:
    """Scroll `locator`'s output area to the top of the notebook view, then shoot the whole window."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.locator(".jp-OutputArea-output", has=locator).first.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.mouse.move(1390, 700)                               # off the plots: no hover labels or mode bars
    page.wait_for_timeout(500)                               # let plotly finish its transitions
    path = ARTIFACTS / f"{stem}.png"
    page.screenshot(path=str(path), full_page=True)
    docs = SCREENSHOTS / docs_name
    if os.environ.get("UNITOK_UPDATE_SCREENSHOTS") == "1" or not docs.exists():
        docs.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, docs)
    return path


def test_quickstart_runs_in_the_browser(browser, lab):
    """00 runs without a traceback; the TokenGrid's sliders and plotly figure are drawn."""
    page = _open_and_run_all(browser, lab, "00_quickstart.ipynb")
    try:
        assert not _errors(page), _errors(page)
        page.wait_for_selector(".jupyter-widgets.widget-slider, .widget-slider", state="attached", timeout=30_000)
        page.wait_for_selector(".js-plotly-plot", state="attached", timeout=30_000)
        assert page.locator(".jp-OutputArea-output", has_text="mode: smoke").count() == 1
        token_grid = page.locator(".widget-html-content", has_text="Token grid").first
        _screenshot(page, token_grid, "browser_00_quickstart", "quickstart.png")
    finally:
        page.close()


def test_dashboard_steps_in_the_browser(browser, lab):
    """01 runs; then the dashboard's Step and Run buttons train the live trainer and the plots redraw."""
    page = _open_and_run_all(browser, lab, "01_train_step_by_step.ipynb")
    try:
        assert not _errors(page), _errors(page)
        assert page.locator(".jp-OutputArea-output", has_text="mode: smoke").count() == 1
        step_button = page.locator(".widget-button", has_text=re.compile(r"^\s*Step\s*$"))
        assert step_button.count() == 1
        status = page.locator(".widget-html-content", has_text="UI overhead").first

        def shown_step() -> int:
            return int(re.search(r"step (\d+)", status.text_content()).group(1))   # off-screen cells render no innerText

        def loss_path() -> str:
            return page.locator(".js-plotly-plot .scatterlayer .trace path.js-line").first.get_attribute("d") or ""

        # Step: one more training step in the kernel; the status line and the loss curve follow.
        step_before, path_before = shown_step(), loss_path()
        step_button.scroll_into_view_if_needed()
        step_button.click()
        _poll(page, lambda: shown_step() > step_before, 120, "the status to show the extra step")
        assert shown_step() == step_before + 1, "Step must train exactly one step"
        _poll(page, lambda: loss_path() != path_before, 30, "the loss plot to redraw after Step")

        # Run trains in a background thread: set the steps box, press Run, wait until it is idle again.
        more = 30
        dashboard = page.locator(".jp-OutputArea-output", has=status).first
        steps_box = dashboard.locator(".widget-text input").first
        steps_box.fill(str(more))
        steps_box.press("Enter")
        run_button = dashboard.locator(".widget-button", has_text=re.compile(r"^\s*Run\s*$"))
        _poll(page, lambda: run_button.is_enabled(), 60, "the Run button to be enabled")
        run_button.click()
        # While it trains, Run is disabled and must look it: the shared style greys disabled buttons out.
        _poll(page, lambda: run_button.is_disabled() or shown_step() == step_before + 1 + more, 60,
              "Run to be disabled while training")
        if run_button.is_disabled():
            assert float(run_button.evaluate("e => getComputedStyle(e).opacity")) < 0.5
        _poll(page, lambda: shown_step() == step_before + 1 + more and "idle" in status.text_content(), 300,
              f"Run to train {more} steps")
        _screenshot(page, status, "browser_01_train_step_by_step", "dashboard.png")
    finally:
        page.close()


# A small notebook for the layout test: the two views the classroom found cramped, on the bundled checkpoint.
LAYOUT_CELLS = [
    "from unitok_widgets import TokenGrid, ZeroShotPanel, notebook_setup\n"
    "from unitok import UniTok\n"
    "from unitok.data.shapes_dataset import ShapesDataset\n"
    "lab = notebook_setup(checkpoint=True)\n"
    "model = UniTok.from_pretrained(lab.checkpoint).eval()\n"
    "heldout = ShapesDataset(model.config.image_size, split='heldout', length=8)",
    "panel = ZeroShotPanel(model, heldout, num_images=8)\npanel",
    "grid = TokenGrid(model, heldout, num_images=8)\ngrid",
]
VIEWPORT = {"width": 1000, "height": 1100}


def _inside(inner: dict, outer: dict, slack: float = 1.0) -> bool:
    return (inner["x"] >= outer["x"] - slack and inner["x"] + inner["width"] <= outer["x"] + outer["width"] + slack)


def _overlap(a: dict, b: dict) -> bool:
    """True when two bounding boxes share an area (touching edges do not count)."""
    return (min(a["x"] + a["width"], b["x"] + b["width"]) - max(a["x"], b["x"]) > 1 and
            min(a["y"] + a["height"], b["y"] + b["height"]) - max(a["y"], b["y"]) > 1)


def test_zero_shot_panel_and_token_grid_fit_a_1000px_window(browser, lab):
    """At a 1000 px wide window (about 850 px of output area): no column of the ZeroShotPanel or the TokenGrid
    overlaps another or leaves the output area, the Apply button is on screen, and typing comma-separated class
    names then pressing Apply gives one bar per class."""
    path = _scratch_notebook("_layout_1000px.ipynb", LAYOUT_CELLS)
    try:
        page = _open_and_run_all(browser, lab, path.name, viewport=VIEWPORT)
        try:
            assert not _errors(page), _errors(page)
            panel = page.locator(".unitok-zeroshot").first
            panel.wait_for(state="visible", timeout=30_000)
            area = page.locator(".jp-OutputArea-output", has=panel).first.bounding_box()
            columns = [panel.locator(f".unitok-zeroshot-{name}").first for name in ("controls", "image", "bars")]
            boxes = [c.bounding_box() for c in columns]
            assert all(boxes), boxes
            for i in range(3):
                assert _inside(boxes[i], area), (i, boxes[i], area)
                for j in range(i + 1, 3):
                    assert not _overlap(boxes[i], boxes[j]), (i, j, boxes)
            for box in panel.locator("textarea").all():
                assert _inside(box.bounding_box(), boxes[0]), "a text box is cut off"
            apply = panel.locator(".widget-button", has_text=re.compile(r"^\s*Apply\s*$")).first
            apply.scroll_into_view_if_needed()
            b = apply.bounding_box()
            assert b and b["x"] >= 0 and b["x"] + b["width"] <= VIEWPORT["width"], b
            assert b["y"] >= 0 and b["y"] + b["height"] <= VIEWPORT["height"], b
            # one line, commas: three classes, three bars
            classes = panel.locator("textarea").first
            classes.fill("circle, star, heart")
            apply.click()
            _poll(page, lambda: "comma-separated" in panel.inner_text(), 60, "the panel to read three classes")
            labels = panel.locator(".js-plotly-plot .yaxislayer-above .ytick text")
            _poll(page, lambda: sorted(t.strip() for t in labels.all_text_contents()) == ["circle", "heart", "star"], 30,
                  "one bar per class")

            grid = page.locator(".unitok-tokengrid").first
            grid.scroll_into_view_if_needed()
            area = page.locator(".jp-OutputArea-output", has=grid).first.bounding_box()
            figure = grid.locator(".unitok-tokengrid-figure").first.bounding_box()
            side = grid.locator(".unitok-tokengrid-side").first.bounding_box()
            assert figure and side and not _overlap(figure, side), (figure, side)
            assert _inside(figure, area) and _inside(side, area), (figure, side, area)
            assert "Equal colour = the same code" in grid.inner_text()
            for view in (panel, grid):
                assert not view.evaluate(LAYOUT_PROBLEMS_JS), view.evaluate(LAYOUT_PROBLEMS_JS)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "browser_layout_1000px.png"), full_page=True)
        finally:
            page.close()
    finally:
        path.unlink(missing_ok=True)


# The views a class spends most time in, at the width of a laptop's JupyterLab (file browser hidden).
VIEW_CELLS = [
    "from unitok_widgets import GenerationExplorer, TrainingDashboard, UnifiedChat, notebook_setup\n"
    "from unitok import UniTok\n"
    "from unitok.cli.mllm import bundled_mllm_path, load_mllm\n"
    "from unitok.data.shapes_dataset import ShapesDataset\n"
    "from unitok.generator.model import TokenGenerator\n"
    "from unitok.training.tokenizer_trainer import Trainer\n"
    "lab = notebook_setup(checkpoint=True)\n"
    "tokenizer = UniTok.from_pretrained(lab.checkpoint).eval()",
    "trainer = Trainer.from_preset('tiny', data='shapes', overrides=['steps=20', 'eval_images=32', 'eval_every=3',\n"
    "    'checkpoint_every=0', 'log_every=1', 'batch_size=16'])\n"
    "dashboard = TrainingDashboard(trainer, steps=6)\n"
    "dashboard.train(6)\n"
    "dashboard",
    "generator = TokenGenerator.from_pretrained(lab.root / 'data' / 'tiny-generator', tokenizer=tokenizer)\n"
    "explorer = GenerationExplorer(generator, prompt='a yellow heart', num_images=8)\n"
    "for _ in range(3):\n"
    "    explorer.step()\n"
    "explorer",
    "chat = UnifiedChat(load_mllm(bundled_mllm_path()), ShapesDataset(32, 'test', length=8), index=1)\n"
    "chat.ask('what shape is it?')\n"
    "chat",
    "from unitok_widgets import CodebookUsage, ReconstructionViewer\n"
    "test = ShapesDataset(32, 'test', length=32)\n"
    "viewer = ReconstructionViewer(tokenizer, test, other_model=UniTok(tokenizer.config).eval())\n"
    "viewer.drops_button.click()                   # its bar chart of PSNR drops\n"
    "viewer",
    "CodebookUsage(tokenizer, test, num_images=32)",
]
VIEWS = ("trainingdashboard", "generationexplorer", "unifiedchat", "reconstructionviewer", "codebookusage")

# What "fits" means, from the browser's own boxes: every plotly text (titles, tick and axis labels, legends, colour
# bars) inside its figure; the figure, images and controls inside the output area; no legend over a plot area; no
# two titles or legends over each other; colour bars with tick labels; no label or button cut by an ellipsis; no
# broken image.
LAYOUT_PROBLEMS_JS = """(root) => {
    const problems = [];
    const R = e => e.getBoundingClientRect();
    const inside = (a, b, s = 1) => a.left >= b.left - s && a.right <= b.right + s && a.top >= b.top - s &&
                                    a.bottom <= b.bottom + s;
    const within = (a, b, s = 1) => a.left >= b.left - s && a.right <= b.right + s;
    const overlap = (a, b) => Math.min(a.right, b.right) - Math.max(a.left, b.left) > 1 &&
                              Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top) > 1;
    const name = e => (e.textContent || e.getAttribute('class') || '').trim().slice(0, 40);
    const area = R(root.closest('.jp-OutputArea-output'));
    for (const plot of root.querySelectorAll('.js-plotly-plot')) {
        const svg = R(plot.querySelector('.main-svg'));
        if (!within(svg, area)) problems.push(`figure ${Math.round(svg.width)} px wide in ${Math.round(area.width)} px`);
        for (const t of plot.querySelectorAll('text')) {
            const b = R(t);
            if (t.textContent.trim() && b.width > 0 && !inside(b, svg)) problems.push(`text cut: "${name(t)}"`);
        }
        const plots = [...plot.querySelectorAll('.nsewdrag')].map(R);
        const labels = [...plot.querySelectorAll('.gtitle, .annotation, .legend, .g-xtitle, .g-ytitle, .g-y2title')]
            .filter(e => R(e).width > 0);
        for (const l of plot.querySelectorAll('.legend')) {
            if (plots.some(p => overlap(R(l), p))) problems.push(`legend over a plot: "${name(l)}"`);
        }
        for (let i = 0; i < labels.length; i++) for (let j = i + 1; j < labels.length; j++) {
            if (overlap(R(labels[i]), R(labels[j]))) problems.push(`"${name(labels[i])}" over "${name(labels[j])}"`);
        }
        // tick labels of one axis running into another axis's labels, or under a title
        const ticks = [...plot.querySelectorAll('.xtick text, .ytick text, .y2tick text')]
            .filter(t => t.textContent.trim() && R(t).width > 0)
            .map(t => ({t, axis: (t.closest('.subplot') || {}).className?.baseVal + ' ' + t.parentNode.getAttribute('class')}));
        for (let i = 0; i < ticks.length; i++) {
            for (let j = i + 1; j < ticks.length; j++) {
                if (ticks[i].axis !== ticks[j].axis && overlap(R(ticks[i].t), R(ticks[j].t)))
                    problems.push(`tick labels "${name(ticks[i].t)}" and "${name(ticks[j].t)}" overlap`);
            }
            for (const l of labels) if (overlap(R(ticks[i].t), R(l))) problems.push(`"${name(l)}" over tick "${name(ticks[i].t)}"`);
        }
        for (const bar of plot.querySelectorAll('.colorbar')) {
            if ([...bar.querySelectorAll('text')].filter(t => /\\d/.test(t.textContent)).length < 2)
                problems.push('a colour bar without tick labels');
        }
    }
    for (const e of root.querySelectorAll('.widget-label, .widget-label-basic, .widget-button, .widget-dropdown select')) {
        if (R(e).width > 0 && e.scrollWidth > e.clientWidth + 1) problems.push(`label cut: "${name(e)}"`);
    }
    for (const e of root.querySelectorAll('img, .widget-button, .widget-slider, .widget-text, .widget-dropdown')) {
        const b = R(e);
        if (b.width > 0 && !within(b, area)) problems.push(`outside the output area: ${e.tagName} "${name(e)}"`);
    }
    for (const img of root.querySelectorAll('img')) {
        if (img.complete && img.naturalWidth === 0 && R(img).width > 0) problems.push('a broken image');
    }
    return problems;
}"""


def test_dashboard_explorer_chat_and_viewers_fit_a_1000px_window(browser, lab):
    """At a 1000 px wide window (about 820 px of output area), nothing in the training dashboard, the generation
    explorer, the unified chat, the reconstruction viewer or the codebook-usage view is cut, overlapping or outside
    the output area (see LAYOUT_PROBLEMS_JS)."""
    path = _scratch_notebook("_views_1000px.ipynb", VIEW_CELLS)
    try:
        page = _open_and_run_all(browser, lab, path.name, viewport=VIEWPORT)
        try:
            assert not _errors(page), _errors(page)
            problems = {}
            for view in VIEWS:
                root = page.locator(f".unitok-{view}").first
                root.wait_for(state="visible", timeout=60_000)
                root.scroll_into_view_if_needed()
                page.wait_for_timeout(800)                          # plotly lays out after it becomes visible
                found = root.evaluate(LAYOUT_PROBLEMS_JS)
                if found:
                    problems[view] = found
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                root.screenshot(path=str(ARTIFACTS / f"browser_1000px_{view}.png"))
            assert not problems, "\n".join(f"{view}: {p}" for view, found in problems.items() for p in found)
            # a view says when its clicks must wait: the note shows exactly while JupyterLab marks the kernel busy
            indicator = page.locator(".jp-Notebook-ExecutionIndicator").first
            assert indicator.get_attribute("data-status") == "idle"
            # (set and read in one synchronous script: JupyterLab re-renders the indicator soon after)
            shown = indicator.evaluate("""e => {
                const note = document.querySelector('.unitok-trainingdashboard .unitok-busy-note');
                const idle = getComputedStyle(note).display;
                e.setAttribute('data-status', 'busy');
                const busy = getComputedStyle(note).display;
                e.setAttribute('data-status', 'idle');
                return [idle, busy, note.textContent];
            }""")
            assert shown[:2] == ["none", "block"] and "the kernel is busy" in shown[2], shown
        finally:
            page.close()
    finally:
        path.unlink(missing_ok=True)


INTERRUPT_CELLS = [
    "from unitok_widgets import notebook_setup\nimport time, types\nlab = notebook_setup(quiet=True)",
    "trainer = types.SimpleNamespace(step_count=0)\n"
    "with lab.stoppable(trainer):\n"
    "    print('training', flush=True)\n"
    "    for _ in range(600):\n"
    "        time.sleep(0.1)\n"
    "        trainer.step_count += 1",
    "after = 'this cell ran'\nprint(after)",
]


def test_stop_during_run_all_stops_the_queue_with_one_line(browser, lab):
    """Run All, then ■ (Kernel > Interrupt) while the training cell runs: that cell shows one line, no traceback,
    and the cell queued after it does not run."""
    path = _scratch_notebook("_interrupt_run_all.ipynb", INTERRUPT_CELLS)
    base, token = lab
    page = browser.new_page()
    page.set_default_timeout(60_000)
    try:
        page.goto(f"{base}/lab/tree/{path.name}?reset&token={token}")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
        _poll(page, lambda: _kernel_state(lab, path.name) == "idle", 120, "the notebook's kernel to start")
        page.wait_for_timeout(1000)
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        cells = page.locator(".jp-Notebook .jp-CodeCell")
        started = cells.nth(1).locator(".jp-OutputArea-output", has_text="training")     # its output, not its code
        _poll(page, lambda: started.count() > 0, 120, "the training cell to start")
        page.wait_for_timeout(1500)
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Kernel$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Interrupt Kernel$")).click()
        try:
            _poll(page, lambda: page.locator(".jp-OutputArea-output", has_text="■ stopped").count() == 1, 60,
                  "the one-line stop message")
        except TimeoutError:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "failed_interrupt_run_all.png"), full_page=True)
            raise AssertionError(f"no stop message; cells: {[cells.nth(i).inner_text() for i in range(3)]}")
        _poll(page, lambda: _kernel_state(lab, path.name) == "idle", 60, "the kernel to be idle again")
        page.wait_for_timeout(2000)                       # time for a wrongly queued cell to run and print
        stopped = page.locator(".jp-OutputArea-output", has_text="■ stopped").first.inner_text().strip()
        assert stopped.startswith("■ stopped at step ") and "The cells below were not run" in stopped, stopped
        assert "\n" not in stopped and not TRACEBACK.search(stopped), stopped
        assert cells.nth(2).locator(".jp-OutputArea-output").count() == 0, "a queued cell ran after ■"
        prompt = cells.nth(2).locator(".jp-InputArea-prompt").inner_text().strip()
        assert not re.search(r"\d", prompt), f"the third cell ran: prompt {prompt!r}"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "browser_interrupt_run_all.png"), full_page=True)
    finally:
        page.close()
        path.unlink(missing_ok=True)
