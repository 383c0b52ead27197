"""The --cases and --rounds options of the benchmarks that run named cases in rounds."""


def add_case_options(parser, cases: dict, default: str, rounds: int) -> None:
    """--cases (comma-separated names of `cases`, or 'all') and --rounds."""
    parser.add_argument("--cases", default=default,
                        help=f"comma-separated, or 'all': {', '.join(cases)}")
    parser.add_argument("--rounds", type=int, default=rounds)


def case_names(parser, value: str, cases: dict) -> list[str]:
    """The names that --cases `value` asks for; a parser error names the unknown ones."""
    names = list(cases) if value == "all" else value.split(",")
    unknown = [n for n in names if n not in cases]
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(cases)}")
    return names
