'''Warnings that point at the user's call, not at the line of this package that raises them.'''
import sys
import warnings

# modules whose frames lie between the user's call and the warning: this package, and the libraries that call it
# for the user (Zennit's composites register the canonizer, Captum's wrappers and NoiseTunnel call attribute(),
# Quantus calls explain_func)
INTERNAL_MODULES = ('zennit_bnfuse.', 'zennit.', 'captum.', 'quantus.')


def user_stacklevel():
    '''The ``stacklevel`` for :py:func:`warnings.warn`, called in the function that calls this one, that points at the
    first caller outside :py:data:`INTERNAL_MODULES`.'''
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get('__name__', '').startswith(INTERNAL_MODULES):
        frame, level = frame.f_back, level + 1
    return level


def warn_user(message):
    '''``warnings.warn(message)`` (a UserWarning) attributed to the user's call that led to it (see
    :py:func:`user_stacklevel`).'''
    warnings.warn(message, stacklevel=user_stacklevel())
