"""lm-evaluation-harness's own command line with qstar registered as a model:

    python -m qstar.lm_eval run --model qstar --model_args pretrained=runs/qstar/model,thoughts=true --tasks arc_easy

Every flag is the harness's (`python -m qstar.lm_eval run -h`); qstar's model_args are in qstar/core/eval/harness.py.
An error a user can cause (an unknown model_args key, a missing checkpoint, a context the model cannot hold) is one
`error:` line, not a traceback from inside the harness.
"""

from __future__ import annotations

import sys


def main() -> None:
    from rich.console import Console
    from rich.markup import escape

    from qstar.cli.errors import USER_ERRORS, message

    try:
        from lm_eval.__main__ import cli_evaluate

        import qstar.core.eval.harness  # noqa: F401  (registers the model "qstar")

        cli_evaluate()
    except USER_ERRORS as err:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(message(err))}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
