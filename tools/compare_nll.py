"""Paired comparison of two per-token loss dumps (train_gpt.py with DUMP_NLL=path) on the same validation set.

    python3 tools/compare_nll.py A.npz B.npz [--block 2048]

Each dump holds `nll` (nats per scored target), `bytes` (UTF-8 bytes each target adds) and `order` (scoring batch;
unused here). Prints val_loss and val_bpb of both, the difference A - B in bpb and in nats/token (negative: A is
better), and a paired t-test of each difference. Per-target differences are correlated inside a document, so the
test treats contiguous blocks of --block targets as the independent units and uses the ratio (delta-method)
standard error of sum(block differences) / sum(block bytes or targets), with Student's t at n_blocks - 1 degrees of
freedom. Exits 2 with one `error:` line when the dumps are not comparable.
"""
import argparse
import math
import sys

import numpy as np

RECORD_MARGIN_NATS = 0.005  # how far below the SOTA val_loss a new record must be


class DumpError(ValueError):
    pass


def betainc(a, b, x):
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    # The continued fraction converges fast only below this point; above it use I_x(a, b) = 1 - I_{1-x}(b, a).
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a


def _beta_continued_fraction(a, b, x, max_iter=100_000, eps=1e-15, tiny=1e-300):
    """The continued fraction of I_x(a, b), evaluated by the modified Lentz method (Numerical Recipes betacf)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        # Each iteration applies the even then the odd coefficient of the fraction.
        for coef in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + coef * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + coef / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def student_t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom (t may be +-inf)."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    return 0.0 if math.isinf(t) else betainc(df / 2.0, 0.5, df / (df + t * t))


def t_statistic(delta, se):
    """delta / se, defined as 0 for a zero difference with zero spread and +-inf for a nonzero one."""
    if se > 0:
        return delta / se
    return math.copysign(math.inf, delta) if delta else 0.0


def ratio_test(num, den):
    """Paired test of sum(num) / sum(den) over blocks: (delta, delta-method SE, t, two-sided p at n - 1 df)."""
    n = len(num)
    total = den.sum()
    delta = num.sum() / total
    se = float(math.sqrt(n / (n - 1) * np.sum((num - delta * den) ** 2)) / total)
    t = t_statistic(delta, se)
    return float(delta), se, t, two_sided_p(t, n - 1)


def check_pair(a, b):
    """Raise DumpError unless a and b are loss dumps of the same validation targets."""
    for label, dump in (("A", a), ("B", b)):
        for key in ("nll", "bytes"):
            if key not in dump:
                raise DumpError(f"{label} has no '{key}' array")
        if len(dump["nll"]) != len(dump["bytes"]):
            raise DumpError(f"{label} has {len(dump['nll'])} nll values but {len(dump['bytes'])} bytes values")
    if len(a["nll"]) != len(b["nll"]):
        raise DumpError(f"A has {len(a['nll'])} targets and B {len(b['nll'])}: not the same validation set")
    if not np.array_equal(a["bytes"], b["bytes"]):
        raise DumpError("the bytes arrays differ: not the same validation targets")
    if np.sum(a["bytes"]) <= 0:
        raise DumpError("the dumps count no bytes")


def compare(a, b, block=2048):
    """Statistics of A - B for two dumps (mappings with `nll` and `bytes`); see the module docstring."""
    check_pair(a, b)
    nll_a, nll_b = np.asarray(a["nll"], np.float64), np.asarray(b["nll"], np.float64)
    nbytes = np.asarray(a["bytes"], np.float64)
    n_targets, block = len(nll_a), int(block)
    if block < 1 or n_targets <= block:
        raise DumpError(f"{n_targets} targets make fewer than 2 blocks of {block}; use a smaller --block")
    starts = np.arange(0, n_targets, block)
    diff_nats = np.add.reduceat(nll_a - nll_b, starts)
    block_bytes = np.add.reduceat(nbytes, starts)
    block_targets = np.diff(np.append(starts, n_targets)).astype(np.float64)
    delta_bpb, se_bpb, t_bpb, p_bpb = ratio_test(diff_nats / math.log(2), block_bytes)
    delta_nats, se_nats, t_nats, p_nats = ratio_test(diff_nats, block_targets)
    nats_to_bpb = 1.0 / (math.log(2) * nbytes.sum())
    return dict(
        loss_a=float(nll_a.mean()), loss_b=float(nll_b.mean()),
        bpb_a=float(nll_a.sum() * nats_to_bpb), bpb_b=float(nll_b.sum() * nats_to_bpb),
        delta_bpb=delta_bpb, se_bpb=se_bpb, t_bpb=t_bpb, p_bpb=p_bpb,
        delta_nats=delta_nats, se_nats=se_nats, t_nats=t_nats, p_nats=p_nats,
        n_blocks=len(starts), block=block, n_targets=n_targets, n_bytes=int(nbytes.sum()),
    )


def load_dump(path):
    try:
        with np.load(path) as npz:
            # `order` is not needed; skip reading it (full-validation dumps hold tens of millions of targets).
            return {key: npz[key] for key in ("nll", "bytes") if key in npz.files}
    except (OSError, ValueError) as error:
        raise DumpError(f"cannot read {path}: {error}") from None


def report(r, name_a, name_b):
    lines = [f"A {name_a}: val_loss {r['loss_a']:.8f} nats/token  val_bpb {r['bpb_a']:.8f}",
             f"B {name_b}: val_loss {r['loss_b']:.8f} nats/token  val_bpb {r['bpb_b']:.8f}",
             f"{r['n_targets']} targets, {r['n_bytes']} bytes, {r['n_blocks']} blocks of <= {r['block']} targets",
             f"{'A - B (negative: A better)':<28}{'delta':>11}  {'SE':>10}  {'t':>7}  p (two-sided, t with {r['n_blocks'] - 1} df)"]
    for unit, key in (("bpb", "bpb"), ("nats/token", "nats")):
        lines.append(f"  {unit:<26}{r['delta_' + key]:+11.8f}  {r['se_' + key]:10.8f}  {r['t_' + key]:+7.2f}  {r['p_' + key]:.3g}")
    # The record margin is set in nats/token; its bpb size depends on the tokenizer's tokens per byte.
    margin_bpb = RECORD_MARGIN_NATS * r["n_targets"] / (math.log(2) * r["n_bytes"])
    lines.append(f"a record needs {RECORD_MARGIN_NATS} nats/token below the SOTA val_loss (~{margin_bpb:.6f} bpb here); "
                 f"A - B is {r['delta_nats']:+.6f} nats/token")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="dump A (.npz)")
    parser.add_argument("b", help="dump B (.npz)")
    parser.add_argument("--block", type=int, default=2048, help="targets per independent block (default 2048)")
    args = parser.parse_args(argv)
    try:
        result = compare(load_dump(args.a), load_dump(args.b), args.block)
    except DumpError as error:
        print(f"error: {args.a} vs {args.b}: {error}", file=sys.stderr)
        sys.exit(2)
    print(report(result, args.a, args.b))


if __name__ == "__main__":
    main()
