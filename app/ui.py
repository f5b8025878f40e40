"""The Gradio interface: a support-index picker above five tabs wired to :class:`app.handlers.Handlers`.

API names that scripts rely on (keep them): ``/segment``, ``/clusters``, ``/matches``, ``/evaluate``;
also ``/label``, ``/forget_labels`` and ``/load_index``. ``/segment`` can be called with the image
file alone; among its outputs is the predicted label mask as a palette PNG (mode P) of the input's
size whose pixel values are class ids.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import gradio as gr
from PIL import Image, UnidentifiedImageError

from app import draw
from app.handlers import Handlers, user_errors
from app.state import BUILTIN_EXAMPLE_SPLIT, AppState, IndexEntry

__all__ = ["build_app", "ImageInput", "CSS"]

CSS = """
.cribo-legend { display:flex; flex-wrap:wrap; gap:6px 12px; align-items:center; font-size:0.9em; }
.cribo-legend-title { width:100%; font-weight:600; opacity:0.8; }
.cribo-chip { display:inline-flex; align-items:center; gap:5px; white-space:nowrap; }
.cribo-swatch { display:inline-block; width:14px; height:14px; border-radius:3px;
                border:1px solid rgba(0,0,0,0.35); }
.cribo-share { opacity:0.65; }
#cribo-latency { font-size:0.85em; opacity:0.8; }
"""

INTRO = """# CrIBo · dense retrieval and object-level bootstrapping
Segment an image by **retrieving labelled patches** (k-NN label transfer, the CrIBo evaluation protocol), look at
the **object clusters** CrIBo forms across two views, at the **cross-image object matches** it learns from,
evaluate a whole split, and **label new support images** in context."""


class ImageInput(gr.Image):
    """``gr.Image`` (same front-end) whose upload check gives a clear message for a non-image file."""

    is_template = True

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            name = getattr(payload, "orig_name", None) or "the uploaded file"
            raise gr.Error(f"{name} is not a readable image ({type(e).__name__}): upload a PNG, JPEG or WebP "
                           "file") from e


def _image_input(label: str, elem_id: str, height: int = 300) -> ImageInput:
    return ImageInput(label=label, type="filepath", image_mode=None, sources=["upload", "clipboard"],
                      height=height, elem_id=elem_id)


def _out_image(label: str, elem_id: str, height: int | None = None) -> gr.Image:
    return gr.Image(label=label, format="png", interactive=False, height=height, buttons=["download", "fullscreen"],
                    elem_id=elem_id)


@dataclass
class _Shared:
    """What every tab uses: the actions, the index picker, the session's labelled index, examples."""

    h: Handlers
    index_dir: gr.Textbox
    labelled: gr.State
    examples: list[list[str]]
    default: IndexEntry


def _examples(shared: _Shared, target, label: str = "Examples") -> None:
    if shared.examples:
        gr.Examples(examples=[[e[0]] for e in shared.examples[:4]], inputs=[target], label=label)


def _brush(entry: IndexEntry) -> gr.Brush:
    """Brush colours = the index's class colours (exact, so painted pixels map back to class ids)."""
    colours = [draw.colour_hex(c) for c in entry.palette]
    return gr.Brush(colors=colours, default_color=colours[min(1, len(colours) - 1)], color_mode="fixed")


def _palette_legend(entry: IndexEntry) -> str:
    return draw.legend_html(entry.class_names, entry.palette, title="Class colours (brush palette)")


def build_app(state: AppState) -> gr.Blocks:
    """Lay out the app for ``state`` (loads the default index to know its classes and examples)."""
    h = Handlers(state)
    default = state.index("")
    with gr.Blocks(title="CrIBo: retrieval app") as demo:
        gr.Markdown(INTRO)
        with gr.Row(equal_height=False):
            index_dir = gr.Textbox(label="Support index", value="", scale=5, elem_id="index-dir",
                                   placeholder=f"blank = the default: {default.source} · or a directory written by "
                                               "build_index.py --out DIR")
            load_btn = gr.Button("Load index", scale=1, min_width=120)
        index_info = gr.Markdown(default.describe(), label="index")
        labelled = gr.State(None)  # this session's copy of the index with its in-context labels
        shared = _Shared(h, index_dir, labelled, state.examples(), default)
        with gr.Tabs():
            with gr.Tab("Segment", id="segment"):
                _segment_tab(shared)
            with gr.Tab("Clusters", id="clusters"):
                _clusters_tab(shared)
            with gr.Tab("Matches", id="matches"):
                _matches_tab(shared)
            with gr.Tab("Evaluate", id="evaluate"):
                _evaluate_tab(shared, state)
            with gr.Tab("Label", id="label"):
                editor, palette = _label_tab(shared)

        def load_index(index_dir, labelled):
            entry = h.current(index_dir, labelled)
            return entry.describe(), gr.ImageEditor(brush=_brush(entry)), _palette_legend(entry)

        wiring = dict(fn=user_errors(load_index), inputs=[index_dir, labelled], outputs=[index_info, editor, palette])
        load_btn.click(**wiring, api_name="load_index")
        index_dir.submit(**wiring, api_name=False)
    return demo


def _segment_tab(s: _Shared) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            image = _image_input("Query image", "seg-image")
            gt = gr.File(label="Ground-truth mask (optional): PNG of class ids, void 255", file_types=[".png"],
                         height=110, elem_id="seg-gt")
            with gr.Row():
                k = gr.Slider(1, 200, value=50, step=1, label="k (neighbours)")
                vote = gr.Radio(["majority", "soft"], value="majority", label="vote",
                                info="soft: Hummingbird softmax(cos/0.02)")
            btn = gr.Button("Segment", variant="primary", elem_id="seg-btn")
            if s.examples:
                gr.Examples(examples=s.examples[:4], inputs=[image, gt], label="Examples (with ground truth)")
        with gr.Column(scale=3):
            overlay = _out_image("Prediction", "seg-overlay", height=380)
            legend = gr.HTML(label="legend", elem_id="seg-legend")
            scores = gr.Markdown(label="scores", elem_id="seg-scores")
            latency = gr.Markdown(label="latency", elem_id="cribo-latency")
            with gr.Row():
                conf = _out_image("Confidence: vote share of the winner per patch (0 → 1)", "seg-conf", height=240)
                with gr.Column():
                    mask = gr.File(label="Label mask (PNG, pixel value = class id)", height=90, interactive=False)
                    rows = gr.Dataframe(headers=["class", "id", "patch", "pixel"],
                                        label="Per-class IoU % (with a ground-truth mask)", interactive=False,
                                        max_height=260, elem_id="seg-table")
            with gr.Accordion("Details (JSON)", open=False):
                details = gr.JSON(label="details")
    btn.click(user_errors(s.h.segment), [image, s.index_dir, k, vote, gt, s.labelled],
              [overlay, mask, legend, conf, scores, rows, latency, details], api_name="segment")


def _clusters_tab(s: _Shared) -> None:
    gr.Markdown("Two augmented views of one image → the backbone's patch tokens of both → **joint-space "
                "clustering** (Sinkhorn-Knopp on semantic + λ_pos · positional cost). A cluster has the same "
                "colour in both views; one found in a single view is **dropped** (hatched grey).")
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            image = _image_input("Image", "cl-image")
            K = gr.Slider(2, 32, value=8, step=1, label="K clusters")
            lambda_pos = gr.Slider(0.0, 4.0, value=1.0, step=0.25, label="λ_pos (positional cost weight)")
            scale = gr.Slider(0.08, 1.0, value=0.25, step=0.01, label="crop scale (min area fraction)")
            seed = gr.Number(value=0, precision=0, label="seed (views and clustering)")
            photometric = gr.Checkbox(value=True, label="photometric augmentations (DINO's)")
            btn = gr.Button("Cluster", variant="primary", elem_id="cl-btn")
            _examples(s, image)
        with gr.Column(scale=5):
            with gr.Row():
                v1 = _out_image("View 1", "cl-v1", height=280)
                v2 = _out_image("View 2", "cl-v2", height=280)
                boxes = _out_image("The two crops in the image", "cl-boxes", height=280)
            summary = gr.Markdown(label="summary", elem_id="cl-summary")
            rows = gr.Dataframe(headers=["cluster", "colour", "patches in view 1", "patches in view 2", "status"],
                                datatype=["number", "html", "number", "number", "str"], label="Clusters",
                                interactive=False, max_height=320, elem_id="cl-table")
    btn.click(user_errors(_swatches(s.h.clusters)), [image, seed, scale, K, lambda_pos, photometric],
              [v1, v2, boxes, summary, rows], api_name="clusters")


def _matches_tab(s: _Shared) -> None:
    gr.Markdown("Objects (clusters present in both views) of the support images fill a **memory bank**. For each "
                "object of the query's view 1: its nearest bank object, and the **cycle-consistency** check CrIBo "
                "uses to keep a pair (views: random crops and flips, no colour augmentation).")
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            image = _image_input("Query image", "mt-image")
            support = gr.Slider(2, 64, value=16, step=1, label="support images in the bank")
            K = gr.Slider(2, 32, value=8, step=1, label="K clusters")
            lambda_pos = gr.Slider(0.0, 4.0, value=1.0, step=0.25, label="λ_pos (positional cost weight)")
            scale = gr.Slider(0.08, 1.0, value=0.25, step=0.01, label="crop scale (min area fraction)")
            seed = gr.Number(value=0, precision=0, label="seed (views and clustering)")
            btn = gr.Button("Match objects", variant="primary", elem_id="mt-btn")
            _examples(s, image)
        with gr.Column(scale=3):
            summary = gr.Markdown(label="summary", elem_id="mt-summary")
            sheet = _out_image("Query object (left) | its nearest bank object (right); green: cycle-consistent pair",
                               "mt-sheet")
            rows = gr.Dataframe(headers=["query object", "patches", "support image", "object", "cosine",
                                         "cycle-consistent"], label="Pairs", interactive=False, max_height=260,
                                elem_id="mt-table")
    btn.click(user_errors(s.h.matches), [image, s.index_dir, support, K, lambda_pos, seed, scale],
              [sheet, rows, summary], api_name="matches")


def _evaluate_tab(s: _Shared, state: AppState) -> None:
    ds = s.default.index.meta.get("dataset", {})
    if state.config.index:  # the query split of the default index's dataset
        from index.datasets import DEFAULT_SPLITS

        kind0, root0 = ds.get("kind", "voc"), ds.get("root", "")
        split0 = DEFAULT_SPLITS.get(kind0, ("", "val"))[1]
    else:  # held-out generated scenes
        kind0, root0, split0 = "folder", str(state.builtin_root()), BUILTIN_EXAMPLE_SPLIT
    gr.Markdown("Batch mIoU of the support index above on a labelled split: every labelled patch of every image "
                "is retrieved and scored (patch level, the protocol's).")
    with gr.Row():
        with gr.Column(scale=2):
            kind = gr.Dropdown(["voc", "ade20k", "folder", "hf"], value=kind0, label="dataset kind")
            root = gr.Textbox(value=root0, label="dataset root")
            split = gr.Textbox(value=split0, label="query split")
            max_images = gr.Number(value=0, precision=0, label="max images (0 = all)", elem_id="ev-max")
            with gr.Row():
                k = gr.Slider(1, 200, value=50, step=1, label="k")
                vote = gr.Radio(["majority", "soft"], value="majority", label="vote")
            btn = gr.Button("Evaluate", variant="primary", elem_id="ev-btn")
        with gr.Column(scale=3):
            summary = gr.Markdown(label="summary", elem_id="ev-summary")
            chart = _out_image("Per-class IoU chart", "ev-chart")
            with gr.Row():
                rows = gr.Dataframe(headers=["class", "id", "IoU %"], label="Per-class IoU", interactive=False,
                                    max_height=300, elem_id="ev-table")
                files = gr.File(label="Results (JSON, CSV)", file_count="multiple", interactive=False,
                                elem_id="ev-files")
            with gr.Accordion("Results (JSON)", open=False):
                results = gr.JSON(label="results")

    def evaluate(kind, root, split, max_images, index_dir, k, vote, labelled, progress=gr.Progress(track_tqdm=True)):
        return s.h.evaluate(kind, root, split, max_images, index_dir, k, vote, labelled, progress=progress)

    btn.click(user_errors(evaluate), [kind, root, split, max_images, s.index_dir, k, vote, s.labelled],
              [summary, rows, chart, files, results], api_name="evaluate")


def _label_tab(s: _Shared) -> tuple[gr.ImageEditor, gr.HTML]:
    gr.Markdown("**In-context labelling**: upload a new support image, paint its regions with the class colours "
                "(brush menu; the legend names them), add it to the index, and see the query's segmentation "
                "change. Unpainted pixels stay unlabelled. The additions live in this browser session only.")
    with gr.Row():
        with gr.Column(scale=3):
            editor = gr.ImageEditor(label="Support image to label", type="numpy", image_mode="RGBA", format="png",
                                    sources=["upload", "clipboard"], transforms=(), layers=False, height=420,
                                    brush=_brush(s.default), eraser=gr.Eraser(), elem_id="lb-editor")
            palette = gr.HTML(label="palette", value=_palette_legend(s.default))
        with gr.Column(scale=2):
            query = _image_input("Query image to re-segment", "lb-query", height=240)
            with gr.Row():
                k = gr.Slider(1, 200, value=50, step=1, label="k")
                vote = gr.Radio(["majority", "soft"], value="majority", label="vote")
            with gr.Row():
                btn = gr.Button("Add to index and re-segment", variant="primary", elem_id="lb-btn")
                reset = gr.Button("Forget my labels")
            _examples(s, query, "Query examples")
    summary = gr.Markdown(label="summary", elem_id="lb-summary")
    with gr.Row():
        before = _out_image("Before", "lb-before", height=300)
        after = _out_image("After adding your labels", "lb-after", height=300)
    btn.click(user_errors(s.h.label), [editor, query, s.index_dir, k, vote, s.labelled],
              [before, after, summary, s.labelled], api_name="label")
    reset.click(lambda: (None, "Your labels were forgotten: the index is back to what it was."), None,
                [s.labelled, summary], api_name="forget_labels")
    return editor, palette


def _swatches(clusters_fn):
    """Show the clusters table's colour column as a swatch (HTML) next to its hex code."""

    @functools.wraps(clusters_fn)
    def wrapper(*args, **kwargs):
        v1, v2, boxes, summary, rows = clusters_fn(*args, **kwargs)
        rows = [[r[0], f'<span class="cribo-swatch" style="background:{r[1]}"></span> {r[1]}', *r[2:]] for r in rows]
        return v1, v2, boxes, summary, rows

    return wrapper
