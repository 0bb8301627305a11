"""The HTTP model server: repository, protocols, batching, traffic split, metrics.

Needs the ``serve`` extra (FastAPI, uvicorn, Prometheus client): ``pip install 'randkit[serve]'``.
"""

from randkit.extras import require

require("serve", "randkit.serve")  # one line naming the extra instead of a traceback
