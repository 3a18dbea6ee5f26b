"""The web app: `python -m fff_vdi.app --model PIPELINE [--sam SAM2]` (see __main__.py).

    session.py  what it does, without the page: upload, clicks, masks (SAM2), inpainting, downloads
    media.py    masks and clicks drawn over frames, WebM previews, zips
    ui.py       the Gradio page wired to session.py
    assets/     the example video (tools/make_app_example.py)
"""
