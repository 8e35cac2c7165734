import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^    (python3 -m venv .+)$", readme, flags=re.M)
    assert len(commands) >= 2 and "ambient-mri demo" in commands[0] and "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[0].split(" && ")[:3] == commands[1].split(" && ")[:3]  # same set-up, torch first


def test_cli_exit_codes():
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "ambient_mri.cli", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "prep" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "ambient_mri.cli", "recon", "--input", ".", "--out", "x", "--method",
                          "adps"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "needs --checkpoint" in bad.stderr
