"""Print the path to pass to ``--user-dir`` (fairseq needs a folder path, not a module name).

    fairseq-eval-lm DATA --path CKPT --user-dir "$(knnlm-user-dir)" --knnlm ...
"""

from __future__ import annotations

from pathlib import Path


def cli_main() -> None:
    import fairseq_knnlm

    print(Path(fairseq_knnlm.__file__).resolve().parent)


if __name__ == "__main__":
    cli_main()
