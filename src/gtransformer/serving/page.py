"""The web page served at `/`: one self-contained HTML/CSS/JS file (no CDN, no external fonts, works offline).

Portuguese by default with an English toggle; a text mode (`/v1/completions`) and a chat mode
(`/v1/chat/completions`), both streamed; sliders for temperature, top-p and maximum tokens;
Generate and Stop (which aborts the request, and so the generation); tokens per second.
"""

from __future__ import annotations

from importlib.resources import files

PAGE_HTML = files("gtransformer.serving").joinpath("page.html").read_text(encoding="utf-8")
