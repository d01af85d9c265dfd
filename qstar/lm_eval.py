"""lm-evaluation-harness's own command line with qstar registered as a model:

    python -m qstar.lm_eval run --model qstar --model_args pretrained=runs/qstar/model,thoughts=true --tasks arc_easy

Every flag is the harness's (`python -m qstar.lm_eval run -h`); qstar's model_args are in qstar/core/eval/harness.py.
Without --device the model computes where qstar would (CUDA where there is one, else the CPU), not on the harness's
own default, cuda:0. An error a user can cause (a missing lm-eval, an unknown model_args key, a missing checkpoint, a
dataset the Hub cannot give) is one `error:` line, not a traceback from inside the harness.
"""

from __future__ import annotations

import os
import re
import sys

from qstar.cli.errors import USER_ERRORS, message, print_error
from qstar.core.hub import hub_unreachable


def main() -> None:
    offline = hub_unreachable()
    if offline is not None:  # the hub clients answer from their cache at once, instead of half a minute of retries
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import qstar.core.eval.harness  # noqa: F401  (registers the model "qstar"; says which extra installs lm-eval)

        run_harness()
    except USER_ERRORS as err:
        print_error(explained(err, offline))
        sys.exit(1)


def run_harness() -> None:
    """lm_eval.__main__.cli_evaluate, but a --device not given reaches qstar as `auto`: the harness's own default,
    cuda:0, was not the user's choice and fails on a machine without CUDA."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    if getattr(args, "device", "") is None and not getattr(args, "config", None):
        args.device = "auto"
    parser.execute(args)


def explained(err: BaseException, offline: str | None) -> str:
    """The error as one line; offline, a dataset the harness could not fetch is named, with what to do instead."""
    fetched = re.search(r"Couldn't reach '([^']+)'", str(err))
    if offline is None or fetched is None:
        return message(err)
    return (
        f"cannot fetch the dataset {fetched[1]} from the Hugging Face Hub ({offline}): run where the Hub is reachable "
        "once (the harness keeps a copy), or evaluate a task file of your own on local data (docs/GUIDE.md)"
    )


if __name__ == "__main__":
    main()
