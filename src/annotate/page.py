"""The feedback page (gradio): the prompt, answers A and B, four buttons with keys a / b / t / s, progress.

Layout, top to bottom: annotator id and "k of N labelled"; the prompt; A and B side by side; the buttons; a status
line. Every handler takes the annotator id and the id of the pair on screen (a gr.State), asks the Session, and
returns the next pair, so two tabs or two annotators never act on each other's pair. The id typed last is kept in
the browser (gr.BrowserState), so a reload or a restarted server resumes with it.

The keys are a page-load script that clicks the button of the key pressed, unless the focus is in a field one
types into (the annotator id); the buttons' own `trigger_mode="once"` and the store's per-annotator check make a
double press label one pair, not two.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an annotation server

import gradio as gr  # noqa: E402  (after the variable above)

from prefopt.annotate.session import Session  # noqa: E402
from prefopt.data.templates import prompt_text  # noqa: E402

BUTTONS = (("A", "A better  [a]", "btn-a"), ("B", "B better  [b]", "btn-b"),
           ("tie", "Tie  [t]", "btn-tie"), ("skip", "Skip  [s]", "btn-skip"))

KEYS_JS = """
() => {
  const ids = {a: "btn-a", b: "btn-b", t: "btn-tie", s: "btn-skip"};
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    const t = e.target;
    const typing = t && (t.isContentEditable || ((t.tagName === "INPUT" || t.tagName === "TEXTAREA")
                                                 && !t.readOnly && !t.disabled));
    const id = ids[(e.key || "").toLowerCase()];
    if (typing || !id) return;
    const el = document.getElementById(id);
    if (el && !el.disabled) { e.preventDefault(); el.click(); }
  });
}
"""

CSS = """
#progress { text-align: right; font-size: 1.1em; }
#status { min-height: 1.5em; }
"""


def build_page(session: Session, default_annotator: str = ""):
    """The gradio Blocks of the page (not launched)."""
    def view(annotator: str, note: str = ""):
        """(pair id, prompt, A, B, progress, status) for the annotator's next pair."""
        annotator = (annotator or "").strip()
        k, n = session.progress(annotator)
        progress = f"**{k} of {n} labelled**"
        if not annotator:
            return None, "", "", "", f"**0 of {n} labelled**", "Type your annotator id to start."
        pair = session.next_pair(annotator)
        if pair is None:
            return None, "", "", "", progress, f"All {n} pairs are labelled. Thank you, {annotator}!"
        a, b = session.shown(pair)
        return pair.pair_id, prompt_text(pair.prompt), a, b, progress, note

    def on_label(label: str):
        def handler(annotator: str, pair_id: str | None):
            annotator = (annotator or "").strip()
            if not annotator:
                gr.Warning("Type your annotator id first.")
                return view(annotator)
            if pair_id is None:
                return view(annotator)
            written = session.label(annotator, pair_id, label)
            return view(annotator, f"Recorded: {label}." if written else "That pair was already labelled.")
        return handler

    def on_load(stored: str | None):
        annotator = (stored or default_annotator or "").strip()
        return (annotator, *view(annotator))

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],  # no web fonts: works offline
                              font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title="prefopt annotate") as page:
        gr.Markdown("### Which answer is better?\nRead the prompt and both answers, then press **a**, **b**, "
                    "**t** (tie) or **s** (skip). A and B are in random order.")
        with gr.Row():
            annotator = gr.Textbox(label="Annotator id", value=default_annotator, elem_id="annotator", scale=3,
                                   placeholder="your name or id, e.g. alice")
            progress = gr.Markdown(elem_id="progress")
        prompt = gr.Textbox(label="Prompt", interactive=False, lines=3, max_lines=20, elem_id="prompt")
        with gr.Row(equal_height=True):
            answer_a = gr.Textbox(label="Answer A", interactive=False, lines=6, max_lines=40, elem_id="answer-a")
            answer_b = gr.Textbox(label="Answer B", interactive=False, lines=6, max_lines=40, elem_id="answer-b")
        with gr.Row():
            buttons = {label: gr.Button(text, elem_id=eid, variant="primary" if label in ("A", "B") else "secondary")
                       for label, text, eid in BUTTONS}
        status = gr.Markdown(elem_id="status")
        current = gr.State(None)  # the id of the pair on screen
        remembered = gr.BrowserState("", storage_key="prefopt-annotator", secret="prefopt-annotate")

        shown = [current, prompt, answer_a, answer_b, progress, status]
        for label, button in buttons.items():
            button.click(on_label(label), [annotator, current], shown, trigger_mode="once")
        annotator.submit(view, [annotator], shown).then(lambda a: a.strip(), [annotator], [remembered])
        annotator.blur(view, [annotator], shown).then(lambda a: a.strip(), [annotator], [remembered])
        page.load(on_load, [remembered], [annotator, *shown])
    return page, dict(js=KEYS_JS, css=CSS, theme=theme)


def serve(session: Session, host: str = "127.0.0.1", port: int = 7860, default_annotator: str = "") -> None:
    """Serve the page until interrupted (Ctrl-C)."""
    page, look = build_page(session, default_annotator)
    page.queue().launch(server_name=host, server_port=port, ssr_mode=False, show_error=True, inbrowser=False,
                        share=False, **look)
