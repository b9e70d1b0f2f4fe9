"""Every notebook in colabs/ runs top to bottom on CPU."""
import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb"))),
                         ids=os.path.basename)
def test_notebook_executes(path, data_dir, monkeypatch):
  monkeypatch.setenv("VITJAX_COLAB_STEPS", "20")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
