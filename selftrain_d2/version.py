"""The package version, in a module of its own so that reading it imports nothing else; ``--version`` of the
commands (the sweep's too) prints :func:`version_string`."""
__version__ = "0.1.0"


def version_string():
    """``selftrain-d2 X (torch Y, detectron2 Z)``, reading only installed metadata (nothing is imported)."""
    from importlib import metadata

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    detectron2 = version("sal-detectron2")
    if detectron2 == "not installed":
        detectron2 = version("detectron2")
    return f"selftrain-d2 {__version__} (torch {version('torch')}, detectron2 {detectron2})"


def add_version_argument(parser):
    """``--version`` on an argparse ``parser``: print :func:`version_string` and exit."""
    parser.add_argument("--version", action="version", version=version_string(), help="print the versions and exit")
    return parser
