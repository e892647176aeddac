"""One rank of the drift check's test (tests/test_distributed.py launches 2 with torchrun): the
ranks hold equal parameters, then rank 1's drift by 1e-6; check_in_sync must pass the first time
and raise the second. Writes OUT/sync<rank>.txt: 'ok' or the error's message.
usage: ddp_sync_worker.py OUT"""

import sys
from pathlib import Path

import torch

from tspd import distributed

out = Path(sys.argv[1])
w = distributed.init(torch.device("cpu"))
params = [torch.ones(3, 4), torch.arange(5.0)]
result = []
distributed.check_in_sync(params, w)  # equal on both ranks: no error
result.append("equal: ok")
if w.rank == 1:
    params[1][2] += 1e-6
try:
    distributed.check_in_sync(params, w)
    result.append("drifted: ok")
except RuntimeError as err:
    result.append(f"drifted: {err}")
(out / f"sync{w.rank}.txt").write_text("\n".join(result))
distributed.leave(wait=True)
