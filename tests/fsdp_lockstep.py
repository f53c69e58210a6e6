"""Run by tests/test_distributed.py under torchrun (Gloo, CPU): scripts whose ranks were given
different runs. The plan (a JSON file, first on the command line) lists the cases: a script and
its argv, where "{rank}" becomes each rank's number, so that each rank gets its own file. They
run one after the other in one process group, each as `python <script>.py` runs (cli.run, whose
exit is caught here so that the next case follows); each rank writes its exit codes to
<report>.<rank>. Then the plan's last case, which rank 1 never joins: rank 0 waits in the ranks'
first collective until the timeout (ALIGNER_COLLECTIVE_TIMEOUT) ends it, for real this time."""

import importlib
import json
import os
import sys
import time

from support import cli


def run_case(case: dict, rank: int):
    argv = [a.replace("{rank}", str(rank)) for a in case["argv"]]
    cli.run(importlib.import_module(case["script"]).main, argv)


def main(plan_path):
    plan = json.loads(open(plan_path).read())
    rank = int(os.environ["RANK"])
    exit_for_real = os._exit

    def go_on(code):  # cli.run ends a rank with os._exit(code); here the rank goes on to the next case
        raise SystemExit(code)

    os._exit = go_on
    codes = []
    for case in plan["cases"]:
        try:
            run_case(case, rank)
            codes.append(0)
        except SystemExit as e:
            codes.append(e.code)
    with open(f"{plan['report']}.{rank}", "w") as f:
        json.dump(codes, f)
    os._exit = exit_for_real
    if rank == 1:
        time.sleep(300)  # never arrives; torchrun ends this rank once rank 0 has stopped
    run_case(plan["last"], rank)


if __name__ == "__main__":
    main(sys.argv[1])
