"""Studies behind docs/results*.md: each writes its report and JSON; shared helpers live here."""


def write_report(lines: list[str], path) -> None:
    """Write a generated markdown report to ``path`` and print it; a hand-written ``## Reading`` section below the
    generated part of an earlier version of the file survives the regeneration."""
    from pathlib import Path

    path = Path(path)
    lines = list(lines)
    if path.exists():
        old = path.read_text(encoding="utf-8")
        marker = "\n## Reading\n"
        if marker in old:
            lines += [marker.strip("\n"), old.split(marker, 1)[1].rstrip("\n"), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))

