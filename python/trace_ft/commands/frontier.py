"""`trace-ft frontier`: each strategy's learning–forgetting frontier over several seeds.

Each point of a strategy's grid (`continual.frontier.GRIDS`, or `--grid`) is one full
continual run of `trace-ft run`'s sequence, repeated for every seed. Writes
`results.json` (one entry per point and seed, with every metric's matrix),
`report.md` (the points, mean ± spread over seeds, and how TRACE's frontier compares with
the others' at equal plasticity) and `frontier.png`. Results are written after every
run, and `--resume` reuses the runs an interrupted frontier finished, and keeps those of
other grid points made with the same settings (so more seeds can be added at chosen points).
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import torch

from ..config import RunConfig, RunSetup
from ..config.plan import plan_line
from ..continual.frontier import (DEFAULT_STRATEGIES, GRIDS, QUICK_GRIDS, REAL_GRIDS, REAL_STRATEGIES,
                                  grid_points, point_label, write_outputs)
from ..continual.report import versions
from ..continual.sequence import TaskSequence, run_strategy
from ..evaluate import METRICS
from ..store.atomic import write_bytes

def _metric_entry(entry: dict, params: dict, seed: int) -> dict:
    m = entry["metrics"]
    out = {"params": params, "seed": seed, "ap": m["AP"], "bwt": m["BWT"],
           "plasticity": m["plasticity"], "fwt": m["FWT"], "base_delta": m["base_change"],
           "matrix": entry["matrix"], "matrices": entry["matrices"],
           "metrics_by": {k: {"ap": v["AP"], "bwt": v["BWT"], "plasticity": v["plasticity"],
                              "fwt": v["FWT"], "base_delta": v["base_change"]}
                          for k, v in entry["metrics_by"].items()},
           "seconds": entry["costs"]["seconds"], "trainable_fraction": entry["costs"]["trainable_fraction"]}
    if "general" in entry:  # a real model's perplexity on general prose
        out["ppl_delta"] = entry["general"]["perplexity_change"]
        out["perplexity"] = entry["general"]["perplexity"]
    if "general_bench" in entry:  # the standard benchmarks' mean change, and each one's
        out["bench_delta"] = entry["general_bench"]["mean_change"]
        out["bench_delta_se"] = entry["general_bench"]["mean_change_se"]
        out["bench_change"] = entry["general_bench"]["change"]
    for key in ("routing_exact",):
        if key in entry:
            out[key] = entry[key]
    if "storage_bytes_per_task" in entry["costs"]:
        out["storage_bytes_per_task"] = entry["costs"]["storage_bytes_per_task"]
        out["lora_bytes_per_task"] = entry["costs"]["lora_bytes_per_task"]
    return out


def frontier(cfg: RunConfig, out: str | Path | None = None, *, seeds: int = 3, quick: bool = False,
             strategies: list[str] | None = None, grids: list[tuple[str, str, list]] = (),
             metric: str = "exact", resume: bool = False, progress: bool = True, log=None,
             overwrite: bool = False) -> dict:
    from tqdm.auto import tqdm

    log = log or (lambda msg: tqdm.write(msg))
    cfg.validate()
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    real = not cfg.builtin
    table = {k: dict(v) for k, v in (REAL_GRIDS if real else QUICK_GRIDS if quick else GRIDS).items()}
    for name, key, values in grids:
        if name not in table:
            raise ValueError(f"--grid: no frontier for strategy {name!r} (one of {', '.join(table)})")
        if key not in RunConfig.flat_names():
            raise ValueError(f"--grid: {key!r} is not a setting")
        table[name][key] = values
    names = strategies or list(REAL_STRATEGIES if real else DEFAULT_STRATEGIES)
    for name in names:
        if name not in table:
            raise ValueError(f"no frontier for strategy {name!r}; choose from {', '.join(table)}")
    runs = [(name, params, seed) for seed in range(seeds) for name in names
            for params in grid_points(table[name])]
    for name, params, _ in runs[:len(runs) // seeds]:
        cfg.replaced(**params).validate()  # every point's settings, before any run
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out) if out is not None else Path("runs") / ("frontier-" + datetime.now().strftime("%Y%m%d-%H%M%S"))
    results_file = out / "results.json"
    if results_file.exists() and not (resume or overwrite):
        raise ValueError(f"--out {out} holds a frontier already: pass --resume to continue it (and keep its "
                         "runs), or --overwrite to start it again")
    results = {"config": {**cfg.flat(), "seeds": seeds, "quick": quick, "metric": metric,
                          "grids": {n: table[n] for n in names}},
               "versions": versions(), "frontier": {n: [] for n in names}}
    if "trace" in names:
        results["frontier"]["trace_routed"] = []
    if resume and results_file.exists():
        # every finished run is reused and kept, those of other grid points too (a frontier
        # grows: more seeds at chosen points); the settings other than the grids must match
        saved = json.loads(results_file.read_text())
        # (a knob the grids set is each point's own: its base value is not used; routed only
        # adds trace's routed row, to the runs that have it: a study may ask for it later)
        free = {"grids", "seeds", "quick", "threads", "metric", "routed", *(k for n in names for k in table[n])}
        ours = json.loads(json.dumps(results["config"]))  # as JSON has it (tuples are lists)
        # a setting added since the saved runs were made is theirs at its default value
        before = {**json.loads(json.dumps(type(cfg)().flat())), **saved["config"]}
        differ = sorted(k for k in set(saved["config"]) | set(ours)
                        if k not in free and before.get(k) != ours.get(k))
        if differ:
            was = "; ".join(f"{k} {before.get(k)!r}, now {ours.get(k)!r}" for k in differ)
            raise ValueError(f"--resume: {results_file} was run with other settings ({', '.join(differ)}): "
                             f"{was}; give them as they were to resume it")
        for name, entries in saved["frontier"].items():
            results["frontier"].setdefault(name, []).extend(entries)
        results["seconds"] = saved.get("seconds", 0.0)  # the kept runs' time counts too
    done = {(n, json.dumps(e["params"], sort_keys=True), e["seed"])
            for n, es in results["frontier"].items() for e in es}
    setup = RunSetup.open(cfg, progress=progress)
    results["model"] = str(setup.model_dir)
    todo = [(n, p, s) for n, p, s in runs if (n, json.dumps(p, sort_keys=True), s) not in done]
    if todo:
        log(plan_line(setup, [setup.strategy(n, cfg.replaced(seed=s, **p)) for n, p, s in todo],
                      what=f"{len(todo)} runs of the sequence ({len(runs) - len(todo)} done already)"))
    t_start = time.perf_counter()
    bar = tqdm(total=len(runs), desc="frontier", disable=not progress, dynamic_ncols=True)
    sequences: dict[int, TaskSequence] = {}
    for name, params, seed in runs:
        bar.set_description(f"frontier {name} [{point_label(params)}] seed {seed}")
        if (name, json.dumps(params, sort_keys=True), seed) in done:
            bar.update(1)
            continue
        if seed not in sequences:  # (one seed's sequence at a time: its scores of the base)
            sequences = {seed: setup.sequence(seed)}
        seq = sequences[seed]
        point = cfg.replaced(seed=seed, **params)
        entry, extra = run_strategy(setup.strategy(name, point), seq, setup.base, setup.codec,
                                    point.train_config(), seed=seed, device=cfg.device, max_len=cfg.max_len,
                                    general_every=cfg.general_every, score_unseen=cfg.score_unseen)
        results["frontier"][name].append(_metric_entry(entry, params, seed))
        for other, row in extra.items():
            results["frontier"].setdefault(other, []).append(_metric_entry(row, params, seed))
        results["columns"], results["first_task_column"] = seq.columns, seq.first
        results["seconds"] = results.get("seconds", 0.0) + entry["costs"]["seconds"]
        write_bytes(results_file, json.dumps(results, indent=1).encode())  # after every run
        m = entry["metrics_by"][metric]
        log(f"{name:>8s} [{point_label(params)}] seed {seed}: plasticity {m['plasticity']:.1f}, "
            f"BWT {m['BWT'] if m['BWT'] is None else round(m['BWT'], 1)}, AP {m['AP']:.1f}")
        bar.update(1)
    bar.close()
    results["wall_seconds"] = time.perf_counter() - t_start
    write_outputs(results, out, metric)
    log(f"wrote {out}/results.json, report.md, frontier.png")
    return results
