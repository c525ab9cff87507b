"""A classification run does not import MONAI: ``import monai`` imports every MONAI submodule (measured
here: 26 s on a loaded 2-core machine, several seconds on a quiet one), paid by every command, every
study worker and every test subprocess. The segmentation losses import it when they are built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import sys
from losslab.config import load_config
from losslab.losses import build_loss, list_losses
from losslab.models import build_model
cfg = load_config("configs/experiment/demo.yaml", ["model.pretrained=false"])
build_model(cfg.model, num_outputs=2)
build_loss("focal", class_counts=[10, 3])
print("before", "monai" in sys.modules, len(list_losses()))
build_loss("dice", num_classes=3)
print("after", "monai" in sys.modules)
"""


def test_classification_does_not_import_monai_until_a_segmentation_loss_is_built():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("before", "after")))
    before, registered = lines["before"].split()
    assert before == "False" and int(registered) > 10  # every loss registered without MONAI
    assert lines["after"] == "True"  # the segmentation loss is MONAI's underneath
