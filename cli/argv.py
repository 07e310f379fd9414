"""Argument-vector normalisation done before click parses (fMRIPrep-compatible spellings)."""

from __future__ import annotations

# Options that take several values after one flag (argparse nargs='+'), as in fMRIPrep/MRIQC.
GREEDY = {"--participant-label", "--participant_label", "--session-label", "--session_label"}


def expand_greedy(args: list[str]) -> list[str]:
    """``--participant-label 01 02`` → ``--participant-label 01 --participant-label 02``.

    Values run until the next token that starts with ``-``. ``--opt=a`` is kept as is.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if tok in GREEDY:
            j = i + 1
            values = []
            while j < len(args) and not args[j].startswith("-"):
                values.append(args[j])
                j += 1
            if not values:
                out.append(tok)  # let click report the missing value
            for v in values:
                out.extend([tok, v])
            i = j
            continue
        out.append(tok)
        i += 1
    return out
