"""The CLIP model names: importable without torch, so a command line can list and check them before torch loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from modules.clip_names import OPENAI_FILE_NAMES, OPENAI_MODEL_URLS, TINY_MODELS, available_models

ROOT = Path(__file__).resolve().parents[1]


def test_names_import_without_torch():
    code = "import sys, modules.clip_names as n; print(n.available_models(), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['ViT-B/32', 'ViT-B/16', 'tiny-random-ViT/16'] False"


def test_every_openai_name_has_a_url_ending_in_its_file_name():
    assert available_models() == [*OPENAI_MODEL_URLS, *TINY_MODELS]
    assert OPENAI_FILE_NAMES.keys() == OPENAI_MODEL_URLS.keys()
    for name, url in OPENAI_MODEL_URLS.items():
        assert url.endswith("/" + OPENAI_FILE_NAMES[name])
