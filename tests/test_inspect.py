"""The mask inspector (atlas/inspect.py): the tokens the loss sees, in the terminal and as a
self-contained HTML page that a real headless browser (Chromium) renders."""

from __future__ import annotations

import html as htmllib
import os
import re
import shutil
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from atlas.data import encode
from atlas.inspect import SUPERVISED, TAIL, run
from atlas.utils import ConfigError
from tests.helpers import CONF, ROOT
from tests.helpers import supervised_runs


def _compose(tmp_path, *overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("inspect", overrides=["model=tiny_llama", "data.limit=12", "logger=none",
                                             f"paths.output_dir={tmp_path}", *overrides])


def _marked(ins, styles) -> str:
    text = str(ins.text)
    return "".join(text[s.start:s.end] for s in ins.text.spans if str(s.style) in styles)


@pytest.mark.parametrize("granularity", ["step", "action", "thought"])
def test_the_inspector_marks_exactly_the_supervised_tokens(tmp_path, tokenizer, granularity):
    inspections = run(_compose(tmp_path, "selector=critical", "ratio=0.3",
                               f"selector.granularity={granularity}", "inspect.tokens=true"))
    assert len(inspections) == 3 and len({i.trajectory.id for i in inspections}) == 3
    for ins in inspections:
        t = ins.trajectory
        ex = encode(t, tokenizer, granularity=granularity)
        assert _marked(ins, SUPERVISED) == "".join(supervised_runs(ex, tokenizer))
        s = ins.stats
        assert (s["selected"], s["supervised_tokens"], s["fed_tokens"]) == (
            len(t.selected_steps), ex.num_supervised_tokens, len(ex.input_ids))
        assert s["tail_tokens"] > 0 and _marked(ins, {TAIL})  # after the last supervised token
        # a label before every step: index, selected or not, criterion, token count
        labels = re.findall(r"\[step (\d+) \| (selected|not selected)(?: \| ([A-Za-z ]+))? \| "
                            r"(\d+) tokens(?:, \d+ supervised)?\]", str(ins.text))
        assert [int(k) for k, *_ in labels] == list(range(t.num_steps))
        assert [k for k, sel, *_ in labels if sel == "selected"] == [
            str(k) for k in t.selected_steps]
        assert all(crit for _, sel, crit, _ in labels if sel == "selected")  # the oracle's
        assert f"{s['selected']} of {s['candidates']} candidate steps" in ins.header()


def test_chosen_ids_and_bad_ones(tmp_path):
    [first] = run(_compose(tmp_path, "inspect.n=1"))
    [again] = run(_compose(tmp_path, f"inspect.ids=[{first.trajectory.id}]"))
    assert again.trajectory.id == first.trajectory.id
    with pytest.raises(ConfigError, match=r"inspect.ids: \['nope'\] are not training"):
        run(_compose(tmp_path, "inspect.ids=[nope]"))


def test_the_cli_prints_three_trajectories(tmp_path):
    out = subprocess.run([sys.executable, "-m", "atlas.inspect", "model=tiny_llama",
                          "data.limit=12", "logger=none", "selector=critical", "ratio=0.3",
                          f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(re.findall(r"candidate steps selected", out.stdout)) == 3
    assert "| selected | " in out.stdout and "<|im_start|>assistant" in out.stdout


def _chromium() -> str:
    found = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                  if shutil.which(n)), None)
    if found is None:
        msg = "no Chromium (apt-get install chromium): the HTML page is not checked in a browser"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return found


def test_the_html_page_shows_the_supervised_spans_in_a_headless_browser(tmp_path):
    """inspect.html=...: a self-contained page (no network); Chromium renders it, its DOM holds
    the supervised text in highlighted spans, and the screenshot shows the highlight."""
    chromium = _chromium()
    page = tmp_path / "masks.html"
    [ins] = run(_compose(tmp_path, "inspect.n=1", f"inspect.html={page}"))
    assert not re.search(r"(?:src|href)=", page.read_text())
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1400",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=180).stdout
    green = [htmllib.unescape(text) for style, text in
             re.findall(r'<span style="([^"]*)">([^<]*)</span>', dom)
             if "background-color: #00d700" in style or "background-color: #afd7af" in style]
    expected = _marked(ins, SUPERVISED)
    assert expected and "".join("".join(green).split()) == "".join(expected.split())
    png = tmp_path / "masks.png"
    subprocess.run([chromium, *flags, f"--screenshot={png}", page.as_uri()],
                   capture_output=True, timeout=180)
    from PIL import Image

    pixels = Image.open(png).convert("RGB").getdata()
    assert sum(1 for p in pixels if p == (0, 215, 0)) > 1000  # green3 highlight on screen


@pytest.mark.parametrize("family", ["qwen2_5", "llama3_1"])
def test_the_inspector_on_tool_calls(family):
    """Tool-calling trajectories under their templates (Qwen2.5's <tool_call> blocks, Llama-3.1's
    JSON): the marked text is what the masks supervise, calls included, at each granularity."""
    from atlas.inspect import inspect_trajectory
    from tests.helpers import generated, tool_tokenizer

    tok = tool_tokenizer(family)
    for t in generated(6, parallel=False, seed=3):
        for granularity in ("step", "action"):
            ins = inspect_trajectory(t, tok, t.selected_steps, granularity)
            ex = encode(t, tok, granularity=granularity)
            assert _marked(ins, SUPERVISED) == "".join(supervised_runs(ex, tok)), (t.id, granularity)
            assert ins.stats["supervised_tokens"] == ex.num_supervised_tokens
