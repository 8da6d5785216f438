"""Run by test_ddp.py under ``torchrun --standalone --nproc_per_node=2`` (gloo on CPU): ``train.main(argv)`` with
every ``save_checkpoint`` call counted, then ``<out>/<tag>_rank<r>.json`` = this rank's history and saves."""

import json
import os
import sys
from pathlib import Path

from freqmerge import train

out, tag, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
saves: list[str] = []
real_save = train.save_checkpoint


def counting_save(path, state):
    saves.append(os.path.basename(path))
    real_save(path, state)


train.save_checkpoint = counting_save
result = train.main(argv)
history = [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in result["history"]]
rank = int(os.environ["RANK"])
(out / f"{tag}_rank{rank}.json").write_text(json.dumps({"history": history, "saves": saves}))
