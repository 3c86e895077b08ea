'''``python -m zennit_bnfuse``: the ``bnfuse`` command.'''
import sys

from .cli import main

sys.exit(main())
