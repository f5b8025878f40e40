"""The CrIBo Gradio app: segmentation by retrieval, joint-space clusters, cross-image object matches,
batch mIoU and in-context labelling, on top of the ``cribo`` and ``index`` libraries.

Modules: :mod:`app.state` (lazily loaded backbone, indices, banks), :mod:`app.inputs` (upload checks),
:mod:`app.pipeline` (one-image segmentation), :mod:`app.objects` (clusters, bank matches),
:mod:`app.label` (painted mask -> patches),
:mod:`app.draw` (pictures), :mod:`app.handlers` (one action per button), :mod:`app.ui` (layout).
Importing the package loads nothing (gradio, torch and the models are imported on use).
"""
from __future__ import annotations

from app.state import AppConfig, AppState
from cribo.errors import DataError

__all__ = ["AppConfig", "AppState", "StartupError", "build_app", "launch"]


class StartupError(DataError, RuntimeError):
    """The app cannot start (missing weights, unreadable index, ...); the message says why and the fix."""


def build_app(state: AppState):
    """The ``gr.Blocks`` of the app for ``state`` (see :func:`app.ui.build_app`)."""
    from app.ui import build_app as _build

    return _build(state)


def launch(config: AppConfig, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           warm_up: bool = True, prevent_thread_lock: bool = False):
    """Build the app for ``config`` and serve it on ``host:port`` (a public share link only if ``share``).

    With ``warm_up`` the backbone and the default index are loaded (the built-in one generated and
    built on first start) before the server starts, so the first request is fast and a missing
    weights file fails here, with its message, instead of on the first click.
    """
    from app.ui import CSS, build_app as _build

    from app.handlers import USER_ERRORS

    state = AppState(config)
    if warm_up:
        try:
            entry = state.warm_up()
        except USER_ERRORS as e:
            raise StartupError(str(e)) from e
        print(f"cribo app: backbone {state.backbone().source}; index {entry.source} "
              f"({entry.index.ntotal:,} patches, {entry.num_classes} classes)", flush=True)
    demo = _build(state)
    demo.queue(default_concurrency_limit=1)
    return demo.launch(server_name=host, server_port=port, share=share, show_error=True, css=CSS,
                       max_file_size="100mb", prevent_thread_lock=prevent_thread_lock,
                       footer_links=["api", "gradio"])
