'''Sphinx configuration of the zennit_bnfuse documentation (furo theme, MyST Markdown and notebooks).

Build with ``python -m sphinx -W -b html docs docs/_build/html``; the tutorials and the worked examples are executed
during the build, so a broken example fails it.
'''
import os
import sys
from importlib.metadata import version as package_version

sys.path.insert(0, os.path.abspath('..'))
os.environ.setdefault('MPLBACKEND', 'Agg')

project = 'zennit_bnfuse'
author = 'the zennit_bnfuse developers'
copyright = '2026, the zennit_bnfuse developers'
release = package_version('zennit-bnfuse')

extensions = [
    'myst_nb',
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'sphinx.ext.viewcode',
]
source_suffix = {'.md': 'myst-nb', '.ipynb': 'myst-nb'}
exclude_patterns = ['_build', 'jupyter_execute', '**.ipynb_checkpoints']

html_theme = 'furo'
html_title = f'zennit_bnfuse {release}'

myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence', 'deflist']
myst_heading_anchors = 3
# every tutorial and worked example runs at build time; an error fails the build
nb_execution_mode = 'force'
nb_execution_raise_on_error = True
nb_execution_timeout = 300
nb_merge_streams = True

autodoc_default_options = {'members': True, 'show-inheritance': True}
autodoc_typehints = 'none'
autosummary_generate = True
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
# 'Attributes' sections as fields, so that dataclass fields are not described twice
napoleon_use_ivar = True

nitpicky = False
