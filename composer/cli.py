"""What every command-line entry point of the project shares: one-line errors and a clean Ctrl-C.

``run(prog, main)``: a bad input (a ValueError, a missing file, a checkpoint that cannot be used) prints
``prog: error: <message>`` and exits 2, as argparse does for bad flags; Ctrl-C prints ``prog: interrupted`` and
exits 130 (the shell's code for SIGINT). Output files are written atomically (composer/io.py), so neither
leaves a partial file. Error messages name Python keywords where the library raised them; here each is
replaced by the command-line flag that does the same (``CheckpointError.hints``).
"""
from __future__ import annotations

import sys

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def message(e: BaseException) -> str:
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    for python, flag in getattr(e, "hints", {}).items():
        msg = msg.replace(python, flag)
    return msg


def run(prog: str, main, argv=None) -> int:
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, KeyError, OSError) as e:  # CheckpointError is a ValueError
        print(f"{prog}: error: {message(e)}", file=sys.stderr)
        return EXIT_USAGE
