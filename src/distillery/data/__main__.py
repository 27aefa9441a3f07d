"""`python -m distillery.data materialize`: write data/ from the offline sources (used by `make data`)."""

import sys

from distillery.data.sources import materialize_raw
from distillery.settings import get_settings


def main(argv: list[str]) -> int:
    if argv[1:] != ["materialize"]:
        print("usage: python -m distillery.data materialize", file=sys.stderr)
        return 2
    s = get_settings()
    print(materialize_raw(s.data_dir, s.sources_path))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
