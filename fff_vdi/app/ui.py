"""The page (Gradio Blocks): upload, click, make the mask, inpaint, download.

Every handler takes the tab's `Session` from a gr.State and calls its method; user errors
(FFFVDIError: a video that cannot be read, a click outside the frame, no masks yet) become a
message in the page (gr.Error), never a stack trace. The two long steps (SAM2 and inpainting) share
one queue slot (`concurrency_id`), so a second user's job waits in line with its position shown,
and the page stays responsive while they run.
"""

from __future__ import annotations

import functools
import logging
import shutil
from pathlib import Path
from typing import Callable

import gradio as gr

from fff_vdi.app.session import Models, Session
from fff_vdi.errors import FFFVDIError

logger = logging.getLogger(__name__)

ON_OBJECT, NOT_ON_OBJECT = "on the object (+)", "not on the object (-)"
MAX_OBJECTS = 6
GPU_QUEUE = "gpu"  # SAM2 and inpainting: one job at a time, in arrival order

INTRO = """# FFF-VDI: remove an object from a video
1. Upload a video (or take the example).
2. Click on the object in any frame (the slider picks the frame; a click *not on the object* corrects the mask).
3. Make the mask: SAM2 follows the object through every frame.
4. Inpaint, then download the video and its frames."""


def user_errors(handler: Callable) -> Callable:
    """FFFVDIError -> gr.Error with its message; anything else -> a short gr.Error, traceback in the server log."""

    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except FFFVDIError as e:
            raise gr.Error(str(e), print_exception=False) from e
        except gr.Error:
            raise
        except Exception as e:
            logger.exception("%s failed", handler.__name__)
            raise gr.Error(f"{type(e).__name__}: {e} (the server log has the details)", print_exception=False) from e

    return wrapped


def build_demo(models: Models, workdir: Path, example: Path) -> gr.Blocks:
    def new_session(request: gr.Request) -> Session:
        return Session(workdir / request.session_hash)

    with gr.Blocks(title="FFF-VDI video inpainting") as demo:
        session = gr.State(None)
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                video_in = gr.Video(label="1. Video", sources=["upload"], elem_id="video-in", height=300)
                gr.Examples([[str(example)]], inputs=[video_in], label="or try the example", elem_id="examples")
            with gr.Column(scale=2):
                frame_view = gr.Image(label="2. Click on the object", interactive=False, type="numpy", elem_id="frame-view",
                                      buttons=[], height=420)
                frame_slider = gr.Slider(0, 1, value=0, step=1, label="frame", elem_id="frame-slider")
                with gr.Row():
                    click_kind = gr.Radio([ON_OBJECT, NOT_ON_OBJECT], value=ON_OBJECT, label="a click is", elem_id="click-kind")
                    object_id = gr.Dropdown(list(range(1, MAX_OBJECTS + 1)), value=1, label="object", elem_id="object-id")
                    clear = gr.Button("clear the clicks", elem_id="clear-btn")
                clicks_text = gr.Markdown("Upload a video first.", elem_id="clicks-text")
        with gr.Row():
            with gr.Column():
                dilation = gr.Slider(0, 40, value=models.inference.mask_dilation, step=1, label="grow the mask by (pixels)",
                                     elem_id="dilation")
                segment_btn = gr.Button("3. Make the mask", variant="primary", elem_id="segment-btn")
                mask_video = gr.Video(label="the mask over the video", elem_id="mask-video", height=300, autoplay=True, loop=True)
            with gr.Column():
                with gr.Row():
                    steps = gr.Number(models.inference.steps, precision=0, minimum=1, label="denoising steps", elem_id="steps")
                    seed = gr.Number(models.inference.seed, precision=0, label="seed", elem_id="seed")
                inpaint_btn = gr.Button("4. Inpaint", variant="primary", elem_id="inpaint-btn")
                comparison = gr.Video(label="input | mask | result", elem_id="comparison", height=300, autoplay=True, loop=True)
                downloads = gr.File(label="downloads: the video (mp4), its frames and the masks (zip of PNGs)", file_count="multiple",
                                    interactive=False, elem_id="downloads")

        @user_errors
        def load(path: str | None, state: Session | None, request: gr.Request):
            state = state or new_session(request)
            if path is None:  # the video was removed
                state.forget_video()
                return state, None, gr.Slider(0, 1, value=0), "Upload a video first.", None, None, None
            video = state.load(path, models.max_frames)
            slider = gr.Slider(0, video.num_frames - 1, value=0, step=1, label=f"frame (of {video.num_frames})")
            return state, state.frame_view(0), slider, state.describe_clicks(), None, None, None

        @user_errors
        def show(index: int, state: Session | None):
            if state is None or state.video is None:
                return gr.skip()
            return state.frame_view(index)

        @user_errors
        def click(state: Session | None, index: int, kind: str, object_number: int, event: gr.SelectData):
            if state is None:
                raise gr.Error("upload a video first", print_exception=False)
            x, y = event.index
            state.add_click(x, y, int(index), int(object_number), kind == ON_OBJECT)
            return state, state.frame_view(index), state.describe_clicks()

        @user_errors
        def clear_clicks(state: Session | None, index: int):
            if state is None or state.video is None:
                return state, gr.skip(), "Upload a video first."
            state.clear_clicks()
            return state, state.frame_view(index), state.describe_clicks()

        @user_errors
        def segment(state: Session | None, grow: int, index: int, progress=gr.Progress()):
            if state is None or not state.clicks:
                raise gr.Error("no clicks yet: click on the object in the frame first", print_exception=False)
            preview = state.segment(models, int(grow), lambda done, what: progress(done, desc=what))
            return state, str(preview), state.frame_view(index), state.describe_clicks() + " Masks made: inpaint next."

        @user_errors
        def inpaint(state: Session | None, steps_value: float, seed_value: float, progress=gr.Progress()):
            if state is None:
                raise gr.Error("upload a video first", print_exception=False)
            results = state.inpaint(models, int(steps_value), int(seed_value), lambda done, what: progress(done, desc=what))
            return str(results.preview), results.downloads

        def forget(request: gr.Request) -> None:
            shutil.rmtree(workdir / request.session_hash, ignore_errors=True)  # this tab's jobs: written by us, served already

        video_in.change(load, [video_in, session], [session, frame_view, frame_slider, clicks_text, mask_video, comparison, downloads])
        frame_slider.change(show, [frame_slider, session], [frame_view], show_progress="hidden")
        # Every click counts: Gradio's default for an event ("once") drops a click made while the one
        # before is still being drawn. The clicks queue instead and run in order (one at a time per
        # event, default_concurrency_limit=1), each on the session as the click before left it.
        frame_view.select(click, [session, frame_slider, click_kind, object_id], [session, frame_view, clicks_text],
                          show_progress="hidden", trigger_mode="multiple")
        clear.click(clear_clicks, [session, frame_slider], [session, frame_view, clicks_text])
        segment_btn.click(segment, [session, dilation, frame_slider], [session, mask_video, frame_view, clicks_text],
                          concurrency_id=GPU_QUEUE, concurrency_limit=1)
        inpaint_btn.click(inpaint, [session, steps, seed], [comparison, downloads], concurrency_id=GPU_QUEUE, concurrency_limit=1)
        demo.unload(forget)
    return demo
