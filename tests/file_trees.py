"""Byte-level snapshots of directory trees, for bitwise resume tests."""

import pathlib
import zipfile


def tree_bytes(root, skip=()):
    """{relative path: bytes} of every file under root, .keras members unpacked.

    A .keras file is a zip whose members may be compressed, so its members
    are compared too: a difference shows as the member that differs.
    """
    found = {}
    for path in sorted(pathlib.Path(root).rglob("*")):
        if not path.is_file() or path.name in skip:
            continue
        name = str(path.relative_to(root))
        found[name] = path.read_bytes()
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    found[f"{name}:{member}"] = archive.read(member)
    return found
