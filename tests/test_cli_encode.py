"""`nativevit encode` is reachable from the console script and `python -m nativevit` (what torchrun runs)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import PIL.Image

import nativevit as nv


def test_encode_through_python_m_nativevit(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 60), (90, 30)]):
        PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "feats"
    cmd = [sys.executable, "-m", "nativevit", "encode", str(images), "--out", str(out), "--preset", "tiny"]
    done = subprocess.run([*cmd, "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    feats = nv.load_features(out)
    assert sorted(feats) == ["0.png", "1.png"]
    bad = subprocess.run([*cmd[:4], "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
