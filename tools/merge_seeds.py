"""Merge the submission.json files of several seeds of one configuration into the multi-seed layout of the
openai/parameter-golf records (mean and sample std of val_loss/val_bpb, per-seed results, merged compliance).

    python3 tools/merge_seeds.py RUN1/submission.json RUN2/submission.json ... [-o merged/submission.json]
                                 [--sota-loss X]

-o defaults to ./submission.json. With --sota-loss X (the current record's val_loss) it also runs the one-sided
test a record needs: mean val_loss below X - 0.005 nats at p < 0.01, with t = (mean - (X - 0.005)) / (std / sqrt(n))
and p = P(T_{n-1} <= t). Exits 2 with one `error:` line when the runs do not belong together.
"""
import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from compare_nll import RECORD_MARGIN_NATS, student_t_cdf, t_statistic

REQUIRED = ("seed", "val_loss", "val_bpb", "bytes_total")
MUST_AGREE = ("name", "track", "hardware", "bytes_code")
SHARED = ("author", "github_id", "name", "blurb", "date", "track", "hardware", "pytorch_version", "ttt")
# seed_results key -> per-run submission.json key
SEED_FIELDS = (("val_loss", "val_loss"), ("val_bpb", "val_bpb"), ("artifact_bytes", "bytes_total"),
               ("steps", "step_stop"), ("step_avg_ms", "step_avg_ms"), ("eval_time_s", "eval_time_seconds"))
RECORD_P = 0.01


class MergeError(ValueError):
    pass


def present(runs, key):
    """The values of `key` over the runs that have it, in run order."""
    return [run[key] for run in runs if run.get(key) is not None]


def merge_compliance(runs):
    """Per key: AND of booleans; another value kept when all runs agree, else the per-run list (None = missing)."""
    keys = list(dict.fromkeys(key for run in runs for key in run.get("compliance", {})))
    merged = {}
    for key in keys:
        values = [run.get("compliance", {}).get(key) for run in runs]
        if all(isinstance(v, bool) for v in values):
            merged[key] = all(values)
        else:
            merged[key] = values[0] if all(v == values[0] for v in values) else values
    merged["three_seeds"] = len(runs) >= 3
    return merged


def merge(runs):
    """One records-layout dict from the per-seed submission dicts; raises MergeError if they do not belong together."""
    if len(runs) < 2:
        raise MergeError(f"need at least 2 runs to merge, got {len(runs)}")
    for i, run in enumerate(runs):
        missing = [key for key in REQUIRED if run.get(key) is None]
        if missing:
            raise MergeError(f"run {i + 1} lacks {', '.join(missing)}")
    for key in MUST_AGREE:
        if len(set(present(runs, key))) > 1:
            raise MergeError(f"the runs differ in {key}: {present(runs, key)}")
    seeds = [run["seed"] for run in runs]
    if len(set(seeds)) < len(seeds):
        raise MergeError(f"a seed appears twice: {seeds}")
    runs = sorted(runs, key=lambda run: run["seed"])

    merged = {}
    for key in SHARED:
        values = present(runs, key)
        if values:
            merged[key] = max(values) if key == "date" else values[0]
    losses, bpbs = [run["val_loss"] for run in runs], [run["val_bpb"] for run in runs]
    merged.update(val_loss=statistics.fmean(losses), val_loss_std=statistics.stdev(losses),
                  val_bpb=statistics.fmean(bpbs), val_bpb_std=statistics.stdev(bpbs),
                  bytes_total=max(run["bytes_total"] for run in runs))
    if present(runs, "bytes_code"):
        merged["bytes_code"] = present(runs, "bytes_code")[0]
    merged["seeds"] = [run["seed"] for run in runs]
    merged["seed_results"] = {str(run["seed"]): {out: run[key] for out, key in SEED_FIELDS if run.get(key) is not None}
                              for run in runs}
    merged["logs"] = [Path(log).name for log in present(runs, "log")]
    merged["compliance"] = merge_compliance(runs)
    return merged


def differing_shared(runs):
    """Shared fields (other than date and those that must agree) whose values differ between runs."""
    return [key for key in SHARED if key != "date" and key not in MUST_AGREE and len(set(present(runs, key))) > 1]


def sota_test(losses, sota_loss):
    """(t, p) of the record test: H0 mean val_loss >= sota_loss - 0.005, p = P(T_{n-1} <= t)."""
    n = len(losses)
    t = t_statistic(statistics.fmean(losses) - (sota_loss - RECORD_MARGIN_NATS), statistics.stdev(losses) / math.sqrt(n))
    return t, student_t_cdf(t, n - 1)


def load_run(path):
    try:
        run = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MergeError(f"cannot read {path}: {error}") from None
    if not isinstance(run, dict):
        raise MergeError(f"{path} does not hold a JSON object")
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="per-seed submission.json files")
    parser.add_argument("-o", "--output", default="submission.json", help="merged file (default ./submission.json)")
    parser.add_argument("--sota-loss", type=float, help="current record val_loss: run the record significance test")
    args = parser.parse_intermixed_args(argv)
    out = Path(args.output)
    try:
        if any(out.resolve() == Path(path).resolve() for path in args.runs):
            raise MergeError(f"-o {out} would overwrite one of the runs")
        runs = [load_run(path) for path in args.runs]
        merged = merge(runs)
    except MergeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    for key in differing_shared(runs):
        print(f"warning: the runs differ in {key}; keeping seed {merged['seeds'][0]}'s {merged[key]!r}", file=sys.stderr)

    for seed, res in merged["seed_results"].items():
        print(f"seed {seed}: val_loss {res['val_loss']:.8f}  val_bpb {res['val_bpb']:.8f}  "
              f"bytes {res['artifact_bytes']}  steps {res.get('steps', '?')}")
    n = len(merged["seeds"])
    print(f"mean of {n} seeds: val_loss {merged['val_loss']:.8f} ± {merged['val_loss_std']:.8f}  "
          f"val_bpb {merged['val_bpb']:.8f} ± {merged['val_bpb_std']:.8f}  (± = sample std)")
    print(f"bytes_total (largest seed) {merged['bytes_total']}  compliance {json.dumps(merged['compliance'])}")
    if args.sota_loss is not None:
        t, p = sota_test([run["val_loss"] for run in runs], args.sota_loss)
        target = args.sota_loss - RECORD_MARGIN_NATS
        print(f"record test: mean val_loss {merged['val_loss']:.8f} vs SOTA {args.sota_loss:.8f} - {RECORD_MARGIN_NATS} = "
              f"{target:.8f}: t = {t:.4f}, p = P(T_{n - 1} <= t) = {p:.3g}; "
              f"p < {RECORD_P}: {'yes' if p < RECORD_P else 'no'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
