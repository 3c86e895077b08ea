'''The documentation builds with warnings as errors, and every worked example, how-to and tutorial in it runs
(MyST-NB executes them during the build, so a broken example fails this test).'''
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_sphinx_build_without_warnings(tmp_path):
    result = subprocess.run(
        [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b', 'html', '-d', str(tmp_path / 'doctrees'),
         str(ROOT / 'docs'), str(tmp_path / 'html')],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert (tmp_path / 'html' / 'index.html').is_file()
    assert 'fused: -2.0  naive: 1.0' in (tmp_path / 'html' / 'background.html').read_text()
