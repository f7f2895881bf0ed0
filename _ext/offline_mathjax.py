"""Sphinx extension: serve MathJax from the built book itself, so math renders offline.

Jupyter Book loads MathJax from a CDN by default; a reader without network access (or a test
browser in CI) then sees raw TeX. This copies the MathJax 2.7 distribution that the
`jupyter-server-mathjax` package ships into `_build/html/_static/_mathjax/` and points every
page at it. The copy happens after the build, so Jupyter Book does not add a script tag for each
of MathJax's own files to every page.
"""

from __future__ import annotations

import shutil
from pathlib import Path

FOLDER = "_mathjax"

# The package ships MathJax's combined configuration (TeX input with the AMS extensions, HTML-CSS
# output with the STIX web fonts); the settings below only say which parts of a page hold math:
# the classes Sphinx and myst-nb put on it.
COMBINED = "TeX-AMS-MML_HTMLorMML-full"
MATHJAX2_CONFIG = {
    "tex2jax": {
        "inlineMath": [["\\(", "\\)"]],
        "displayMath": [["\\[", "\\]"]],
        "processEscapes": True,
        "processClass": "math|output_area|tex2jax_process|mathjax_process",
        "ignoreClass": "tex2jax_ignore|mathjax_ignore",
    },
    # only the STIX web fonts ship with the package: never look for TeX fonts
    "HTML-CSS": {
        "availableFonts": [],
        "preferredFont": None,
        "webFont": "STIX-Web",
        "imageFont": None,
    },
    "showMathMenu": False,
    "messageStyle": "none",
}


def _mathjax_dir() -> Path:
    import jupyter_server_mathjax

    return Path(jupyter_server_mathjax.__file__).parent / "static"


def _on_config_inited(app, config) -> None:
    config.mathjax_path = f"{FOLDER}/MathJax.js?config={COMBINED}"
    config.mathjax2_config = MATHJAX2_CONFIG
    config.mathjax3_config = None


def _on_build_finished(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    target = Path(app.outdir) / "_static" / FOLDER  # Sphinx resolves mathjax_path there
    if not target.exists():
        shutil.copytree(
            _mathjax_dir(), target, ignore=shutil.ignore_patterns("*.py", "__pycache__")
        )


def setup(app):
    _mathjax_dir()  # fail early, at configuration time, if the package is missing
    app.connect("config-inited", _on_config_inited, priority=900)
    app.connect("build-finished", _on_build_finished)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1.0"}
