"""The interactive dashboard: `tspd harvest RUN_DIR` precomputes subcomponent statistics into
the run folder's dashboard.sqlite; `tspd serve RUN_DIR` serves the page and its JSON API locally.

Example:
    >>> from tspd.app import harvest, serve
    >>> harvest("runs/induction")        # doctest: +SKIP
    >>> serve("runs/induction")          # doctest: +SKIP  (http://127.0.0.1:8765/)
"""

from tspd.app.harvest import harvest
from tspd.app.server import make_server, serve

__all__ = ["harvest", "make_server", "serve"]
