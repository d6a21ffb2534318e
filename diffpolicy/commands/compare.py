"""`diffpolicy compare`: two policies' evaluations, seed by seed (McNemar's exact test).

    diffpolicy eval --checkpoint runs/a --episodes 100 --seed 100000
    diffpolicy eval --checkpoint runs/b --episodes 100 --seed 100000
    diffpolicy compare --a runs/a/eval_seed100000_n100 --b runs/b/eval_seed100000_n100

Each side takes one or more `diffpolicy eval` outputs of one policy (directories holding
`episodes.json`, or the files), on disjoint seeds: e.g. seeds 100000-100099 and 100100-100299 of two
calls. Prints each policy's success rate with its 95 % Wilson interval and, on the seeds both played,
the seeds B solved where A failed (gained), the reverse (lost) and McNemar's exact two-sided p;
`--json` prints the same as JSON (`evaluation.compare`).
"""

from __future__ import annotations

import argparse
import json

from diffpolicy.evaluation.compare import compare, load_outcomes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--a", nargs="+", required=True, metavar="EVAL",
                        help="policy A's evaluation directories or episodes.json files")
    parser.add_argument("--b", nargs="+", required=True, metavar="EVAL",
                        help="policy B's evaluation directories or episodes.json files")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")


def run(args: argparse.Namespace) -> int:
    result = compare(load_outcomes(args.a), load_outcomes(args.b))
    print(json.dumps(result.to_dict(), indent=1) if args.json else result)
    return 0
