"""`trace-ft adapt` under torchrun, interruptible at a step (the resume test):

    torchrun --nproc-per-node 2 adapt_parallel_worker.py CACHE HISTORY OUT MODE STOP_AT RESUME

STOP_AT > 0: every rank stops after that step, as an interrupted launch would (the last
checkpoint stays); RESUME 1: continue from it.
"""

import sys

from trace_ft.commands.adapt import adapt
from trace_ft.config import RunConfig
from trace_ft.lm.parallel import exit_rank


def main() -> None:
    cache, history, out, mode, stop_at, resume = sys.argv[1:7]
    cfg = RunConfig.from_dict(dict(size="tiny", steps=8, trace_probe_steps=3, n_train=64, n_test=16,
                                   batch_size=8, threads=1, cache_dir=cache, parallel=mode))

    def stop(done: int) -> None:
        if done == int(stop_at):
            raise KeyboardInterrupt

    adapt(cfg, "builtin", "rev", history, out, checkpoint_every=3, resume=resume == "1",
          progress=False, log=print, on_step=stop)


if __name__ == "__main__":
    main()
    exit_rank(0)  # as the trace-ft program ends a rank
