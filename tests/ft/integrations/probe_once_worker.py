"""`trace_optimizer` on 2 gloo ranks with an unsharded model: rank 0 probes, the others
receive its core; when rank 0's probe fails, every rank raises (none waits forever).

    torchrun --nproc-per-node 2 probe_once_worker.py OUT_DIR {ok|fail}

Each rank writes OUT_DIR/probe_once.<rank>.json: the core it got, or the error it raised.
"""

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from test_hf import fresh_model  # noqa: E402
from trace_ft.integrations.hf import trace_optimizer  # noqa: E402
from trace_ft.lm.batches import EncodedSet  # noqa: E402
from trace_ft.lm.parallel import exit_rank  # noqa: E402
from trace_ft.lm.text import CharTokenizer  # noqa: E402
from trace_ft.tasks import builtin_task  # noqa: E402


def main() -> None:
    out, case = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ds = EncodedSet(builtin_task("rev", n_train=32, n_test=4).train, CharTokenizer())
    batches = list(DataLoader(ds, batch_size=8, collate_fn=ds.collate))
    if case == "fail":
        batches = [{"input_ids": b["input_ids"]} for b in batches]  # no labels: no loss to probe
    try:
        opt = trace_optimizer(fresh_model(), batches if rank == 0 else None, lr=1e-2, probe_steps=2,
                              budget=0.05)
        result = {"core": opt.trace.core.numel_selected, "probed": opt.trace.probe is not None,
                  "digest": hash(tuple(int(i) for e in opt.trace.core.values() for i in e.indices[:50]))}
    except Exception as exc:  # what the test checks: every rank ends with an error
        result = {"error": f"{type(exc).__name__}: {exc}"}
    (out / f"probe_once.{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_rank(0)  # skip the interpreter's teardown, where gloo can abort a finished rank
