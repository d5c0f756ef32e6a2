"""`semiseg-la`: segment | train | finetune | evaluate | models | bench.

Every user-facing failure (bad input, unsafe checkpoint, bad config) ends as one line on stderr
(and an `error` record with `--progress json`) and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..errors import SemiSegError
from ..progress import JsonLinesProgress, close_active_reporters


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """All subcommands; only `models` when that is the command, so listing the catalog (which the Slicer
    module does on entry) never pays for importing torch."""
    from . import models

    parser = argparse.ArgumentParser(prog="semiseg-la", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    if command == "models":
        modules = [models]
    else:
        from . import bench, evaluate, segment, train

        modules = [segment, train, evaluate, models, bench]
    for module in modules:
        module.register(sub)
    return parser


def _version() -> str:
    from .. import __version__

    return f"semiseg-la {__version__}"


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    json_progress = getattr(args, "progress", None) == "json"
    try:
        return int(args.handler(args) or 0)
    except SemiSegError as exc:
        if not getattr(exc, "report_on_this_rank", True):  # torchrun: the rank that hit it reports, once
            close_active_reporters()
            return exc.exit_code
        return _fail(str(exc), exc.kind, exc.exit_code, json_progress)
    except KeyboardInterrupt:
        return _fail("interrupted", "cancelled", 130, json_progress)
    except MemoryError:
        return _fail("out of memory (host RAM)", "oom", 5, json_progress)
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError, without importing torch here
        if "out of memory" not in str(exc).lower():
            raise
        return _fail("GPU out of memory, also after moving accumulation to the CPU; use --device cpu", "oom", 5,
                     json_progress)


def _fail(message: str, kind: str, code: int, json_progress: bool) -> int:
    message = " ".join(message.split())
    close_active_reporters()
    if json_progress:
        JsonLinesProgress().error(message, kind)
    print(f"semiseg-la: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
