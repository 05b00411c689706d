"""`make demo` (jobs/demo.py) runs the real training loop end to end and writes its grids."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_trains_and_writes_sample_grids(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "demo.py"), "--out", str(tmp_path),
                          "--steps", "4", "--every", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    grids = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert grids == ["step0000002_ab.png", "step0000002_ba.png", "step0000004_ab.png", "step0000004_ba.png"]
    assert "cycle_a" in out.stdout.splitlines()[-1]
