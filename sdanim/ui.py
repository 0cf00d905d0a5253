"""`sdanim.ui`: the browser app's public name (it lives in `sdanim.frontends.ui`).

    sdanim.ui.launch(model=model)   # inline in a notebook
"""

from sdanim.frontends.ui import *  # noqa: F401,F403
from sdanim.frontends.ui import __all__  # noqa: F401
