"""The model-card template ships in the wheel: a non-editable install writes a card (issue 8 item 16)."""

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

from training_scripts import REPO, SUBPROCESS_ENV


def test_built_wheel_ships_the_model_card_template_and_writes_a_card(tmp_path):
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w"]
    subprocess.run([*build, str(wheels)], check=True, capture_output=True, env=SUBPROCESS_ENV)
    (wheel,) = wheels.glob("diffusers_onestep-*.whl")
    assert "diffusers_onestep/model_cards/onestep_student.md" in zipfile.ZipFile(wheel).namelist()

    site = tmp_path / "site"  # a non-editable install, found before the editable checkout
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site)]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True, env=SUBPROCESS_ENV)
    code = textwrap.dedent(
        f"""
        import diffusers_onestep
        from diffusers_onestep.training_utils import save_model_card
        assert diffusers_onestep.__file__.startswith({str(site)!r}), diffusers_onestep.__file__
        save_model_card({str(tmp_path / "out")!r}, base_model="org/teacher", method_name="PG-SwiftBrush", paper="p",
                        script="training/train_pg_swiftbrush.py", command="accelerate launch ...", metrics={{}},
                        hyperparameters={{}}, t_init=999, input_type="noise")
        """
    )
    (tmp_path / "out").mkdir()
    env = {**SUBPROCESS_ENV, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    card = Path(tmp_path / "out" / "README.md").read_text()
    assert "library_name: diffusers" in card and "import diffusers_onestep" in card
    assert not os.path.exists(REPO / "model_cards" / "onestep_student.md")  # it lives inside the package only
